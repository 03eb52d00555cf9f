"""Sizing the KV pool: how many blocks the configured KV memory holds."""

from __future__ import annotations

import mlx.core as mx

from .. import sysinfo
from ..config import EngineConfig
from ..errors import ConfigError
from ..kernels.kv_quant import QuantSpec
from ..models.loader import LoadedModel
from ..storage.kv_pool import KVPool
from .window_groups import blocks_per_sequence, window_counts


def plan_pool(cfg: EngineConfig, lm: LoadedModel, max_context: int) -> tuple[int, mx.Dtype, dict[int, int]]:
    """Returns (num_blocks, kv dtype, window blocks per sliding window W) for the configured KV memory.

    "dynamic" takes `dynamic_fraction` of the memory available after the weights, capped at what
    max_num_seqs sequences of max_context tokens could use (never less than one full context).
    Sliding-window layer groups (engine/window_groups.py) get window blocks for max_num_seqs sequences (one
    prefill chunk plus the window before it each) and as many again for cached prefixes' last blocks, never
    more than logical blocks; the rest of the budget goes to logical blocks (the full-attention layers).
    """
    kv = cfg.kv
    dtype = lm.dtype if kv.dtype == "auto" else getattr(mx, kv.dtype)
    quant = QuantSpec.from_config(kv)
    counts = window_counts(lm.plan)

    def per_block(n_layers: int) -> int:
        return KVPool.bytes_per_block(n_layers, lm.n_kv_heads, kv.block_size, lm.head_dim, dtype, quant)

    full = per_block(lm.n_layers - sum(counts.values()))
    win = {w: per_block(n) for w, n in counts.items()}
    need = {w: cfg.max_num_seqs * (blocks_per_sequence(w, kv.block_size, cfg.prefill_chunk)
                                   + blocks_per_sequence(w, kv.block_size, 1)) for w in counts}
    together = full + sum(win.values())  # one logical block with a window block for every group
    blocks_per_ctx = -(-max_context // kv.block_size) + 1
    if together == 0:  # no paged layer (e.g. MLA): blocks are bookkeeping only, KV lives per sequence
        return blocks_per_ctx * cfg.max_num_seqs, dtype, {}
    if kv.memory == "dynamic":
        budget = int(sysinfo.available_memory() * kv.dynamic_fraction)
        n = min(_logical(budget, full, together, win, need), blocks_per_ctx * min(cfg.max_num_seqs, 4))
        n = max(n, min(blocks_per_ctx, budget // together), 1)
    else:
        n = _logical(kv.memory, full, together, win, need)
        if n < 1:
            raise ConfigError(
                f"kv_cache_memory {kv.memory} bytes is smaller than one KV block ({together} bytes for "
                f"block size {kv.block_size}); use --kv-cache-memory {together * blocks_per_ctx} or more (one full "
                "context)"
            )
    return int(n), dtype, {w: int(min(n, need[w])) for w in counts}


def _logical(budget: int, full: int, together: int, win: dict, need: dict) -> int:
    # Logical blocks the budget holds once the window groups have theirs (each group never more than logical).
    n = budget // together
    if not win or all(n >= need[w] for w in win):
        rest = budget - sum(need[w] * b for w, b in win.items())
        return max(n, rest // full) if win else n
    return n
