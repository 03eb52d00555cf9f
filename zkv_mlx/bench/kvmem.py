"""`zkv-mlx bench kvmem`: KV bytes per token for each format (all layers, scales and biases included).

Sizes are measured on real pools of the model's geometry (the arrays' nbytes), not computed from a formula.
Result line: {"model", "formats": {name: {"kv_format", "bytes_per_token", "ratio_vs_fp16", "tail_bytes_per_seq",
"sink_bytes_per_seq", "with_seq_bytes": {context: {"bytes_per_token", "ratio_vs_fp16"}}}}}: `bytes_per_token` counts
the blocks with every scale and bias; `with_seq_bytes` adds one sequence's full-precision tail block and sink rows
(per-channel keys), spread over a sequence of `context` tokens (the fp16 pool has none).
"""

from __future__ import annotations

import mlx.core as mx

from ..config import KV_QUANTS, KVCacheConfig
from ..kernels.kv_quant import QuantSpec
from ..storage.kv_pool import KVPool
from .common import emit, log, machine

BLOCKS = 4
CONTEXTS = (1024, 4096)


def measure(n_layers: int, n_kv_heads: int, head_dim: int, quant: str, block_size: int | None = None,
            group_size: int | None = None) -> dict:
    """Bytes per token of one format, from a small pool's arrays."""
    kv = KVCacheConfig(quant=quant, block_size=block_size or "auto", group_size=group_size)
    dtype = mx.float16 if quant == "none" else mx.float32
    pool = KVPool(n_layers, BLOCKS, n_kv_heads, kv.block_size, head_dim, dtype, QuantSpec.from_config(kv))
    stored = sum(a.nbytes for layer in pool.k + pool.v for a in (layer if isinstance(layer, list) else [layer]))
    # per partial block of a running sequence: full-precision key rows (per-channel keys only)
    tail = sum(a[0].nbytes for a in pool.tail_k)
    # per sequence with sinks: one sink-slab slot ([H, sinks, D] per layer), as the pool allocates it
    sinks = n_layers * n_kv_heads * kv.sinks * head_dim * dtype.size if pool.tail_k and kv.sinks else 0
    return {"kv_format": pool.format_name, "block_size": kv.block_size,
            "bytes_per_token": stored / (BLOCKS * kv.block_size), "tail_bytes_per_seq": tail,
            "sink_bytes_per_seq": sinks}


def run(args) -> int:
    from ..models.loader import load_model

    lm = load_model(args.model)
    log(args, f"{lm.name}: {lm.n_layers} layers, {lm.n_kv_heads} KV heads, head_dim {lm.head_dim}")
    out = {}
    for q in KV_QUANTS:
        out[q] = measure(lm.n_layers, lm.n_kv_heads, lm.head_dim, q, args.block_size, args.kv_group_size)
    fp16 = out["none"]["bytes_per_token"]
    for q, r in out.items():
        r["ratio_vs_fp16"] = round(r["bytes_per_token"] / fp16, 4)
        per_seq = r["tail_bytes_per_seq"] + r["sink_bytes_per_seq"]
        r["with_seq_bytes"] = {n: {"bytes_per_token": round(r["bytes_per_token"] + per_seq / n, 1),
                                   "ratio_vs_fp16": round((r["bytes_per_token"] + per_seq / n) / fp16, 4)}
                               for n in CONTEXTS}
        log(args, f"{q:6s} {r['kv_format']:40s} {r['bytes_per_token']:9.1f} B/token  {r['ratio_vs_fp16']:.3f}x fp16")
    emit({"model": lm.name, "machine": machine(), "formats": out})
    return 0
