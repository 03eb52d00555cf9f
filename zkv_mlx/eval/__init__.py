"""`zkv-mlx eval ...`: quality measurements (perplexity and KL of quantized KV against full precision)."""
