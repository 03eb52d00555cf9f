"""Writes a random-weight mlx-lm model directory with the bundled tokenizer, for benchmarks that need a shape the
bundled model lacks (e.g. KV heads that split over 2 ranks):

    python -m zkv_mlx.bench.random_model DIR [--family llama] [--hidden 512] [--layers 8] [--heads 8]
        [--kv-heads 4] [--intermediate 1408] [--seed 0]

Speed figures only: the weights are random (normal, std 0.02), so the text is meaningless.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import zkv_mlx  # noqa: F401  (OpenBLAS before mlx.core)


def write(path: Path, family: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
          seed: int = 0) -> Path:
    """Writes config.json, model.safetensors and the tokenizer files into `path`; returns it."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    from .. import paths
    from ..models.tokenizer import tokenizer_from_gguf_metadata

    _, meta = mx.load(str(paths.default_model_path()), return_metadata=True)
    tok = tokenizer_from_gguf_metadata(meta)
    cfg = dict(model_type=family, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
               num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=4096, tie_word_embeddings=True, vocab_size=tok.vocab_size)
    model_class, args_class = _get_classes(cfg)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(cfg))
    weights = [(k, mx.ones_like(v) if k.endswith("norm.weight") else mx.random.normal(v.shape) * 0.02)
               for k, v in tree_flatten(model.parameters())]
    model.load_weights(weights)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(cfg))
    tok.save(path)
    return path


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m zkv_mlx.bench.random_model", description=__doc__.split("\n")[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--family", default="llama")
    for flag, default in (("hidden", 512), ("layers", 8), ("heads", 8), ("kv-heads", 4), ("intermediate", 1408),
                          ("seed", 0)):
        p.add_argument("--" + flag, type=int, default=default)
    a = p.parse_args()
    write(a.dir, a.family, a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate, a.seed)
    print(a.dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
