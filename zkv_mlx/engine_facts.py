"""What the public API needs to know about a running engine, read once on the engine thread.

`ZKV` and `Session` never read the engine's attributes from the caller's thread (the engine thread owns them);
they use this frozen record, filled by `EngineThread.call(read_facts)`. It is also the one place above the
engine that knows where those facts live inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """Fixed for the life of an engine: the loaded model and the KV pool's geometry and format."""

    tokenizer: Any
    model_name: str
    model_path: str
    family: str
    fingerprint: str
    weights: str
    vocab_size: int
    max_context: int
    kv_format: str  # names the stored bytes (block-hash root, session files)
    kv_dtype: str
    kv_quantized: bool
    kv_blocks: int
    block_size: int
    bytes_per_block: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    sink_section_bytes: int  # int4 pools: bytes of the sink-key section at the end of a K block; else 0
    has_ssd: bool
    has_state: bool  # hybrid model: sessions carry its state layers (engine/snapshots.py)


def read_facts(engine) -> EngineFacts:
    """Reads the facts from an Engine; call it on the engine thread (`EngineThread.call(read_facts)`)."""
    lm, pool = engine.lm, engine.runner.pool
    return EngineFacts(
        tokenizer=lm.tokenizer, model_name=lm.name, model_path=str(lm.path), family=lm.family,
        fingerprint=lm.fingerprint, weights=lm.weights_format,
        vocab_size=lm.plan.vocab_size, max_context=engine.max_context,
        kv_format=engine.kv_format, kv_dtype=str(pool.dtype).split(".")[-1], kv_quantized=pool.quant is not None,
        kv_blocks=pool.num_blocks, block_size=engine.blocks.block_size, bytes_per_block=engine.bytes_per_block,
        n_layers=getattr(engine, "kv_bytes", pool).n_layers, n_kv_heads=pool.n_kv_heads, head_dim=pool.head_dim,
        sink_section_bytes=getattr(pool, "sink_section_bytes", 0), has_ssd=engine.ssd is not None,
        has_state=engine.snapshots is not None,
    )
