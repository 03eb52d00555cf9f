"""Sizing the KV pool: how many blocks the configured KV memory holds."""

from __future__ import annotations

import mlx.core as mx

from .. import sysinfo
from ..config import EngineConfig
from ..errors import ConfigError
from ..kernels.kv_quant import QuantSpec
from ..models.loader import LoadedModel
from ..storage.kv_pool import KVPool


def plan_pool(cfg: EngineConfig, lm: LoadedModel, max_context: int) -> tuple[int, mx.Dtype]:
    """Returns (num_blocks, kv dtype) for the configured KV memory.

    "dynamic" takes `dynamic_fraction` of the memory available after the weights, capped at what
    max_num_seqs sequences of max_context tokens could use (never less than one full context).
    """
    kv = cfg.kv
    dtype = lm.dtype if kv.dtype == "auto" else getattr(mx, kv.dtype)
    per_block = KVPool.bytes_per_block(lm.n_layers, lm.n_kv_heads, kv.block_size, lm.head_dim, dtype,
                                       QuantSpec.from_config(kv))
    blocks_per_ctx = -(-max_context // kv.block_size) + 1
    if per_block == 0:  # no paged layer (e.g. MLA): blocks are bookkeeping only, KV lives per sequence
        return blocks_per_ctx * cfg.max_num_seqs, dtype
    if kv.memory == "dynamic":
        budget = int(sysinfo.available_memory() * kv.dynamic_fraction)
        n = min(budget // per_block, blocks_per_ctx * min(cfg.max_num_seqs, 4))
        n = max(n, min(blocks_per_ctx, budget // per_block), 1)
    else:
        n = kv.memory // per_block
        if n < 1:
            raise ConfigError(
                f"kv_cache_memory {kv.memory} bytes is smaller than one KV block ({per_block} bytes for "
                f"block size {kv.block_size}); use --kv-cache-memory {per_block * blocks_per_ctx} or more (one full "
                "context)"
            )
    return int(n), dtype
