"""Model loading (GGUF, mlx-lm directories), tokenizer and the paged attention wrapper."""
