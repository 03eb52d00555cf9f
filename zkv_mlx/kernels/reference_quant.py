"""Pure-MLX reference decode attention over pools in any KV format (float or `mx.quantize` triples)."""

from __future__ import annotations

import mlx.core as mx

from .kv_format import is_quantized, pool_format
from .reference import paged_attention_reference


def _gather_blocks(pool, block_tables: mx.array, head_dim: int) -> mx.array:
    # [B, nb] block ids -> [B * nb, H, BS, D], dequantized where needed
    ids = block_tables.reshape(-1)
    if not is_quantized(pool):
        return pool[ids]
    fmt = pool_format(pool, head_dim)
    packed, scales, biases = pool
    return mx.dequantize(packed[ids], scales[ids], biases[ids], group_size=fmt.group_size, bits=fmt.bits)


def paged_attention_reference_quantized(q: mx.array, k_pool, v_pool, block_tables: mx.array,
                                        context_lens: mx.array, scale: float,
                                        max_len: int | None = None) -> mx.array:
    """`paged_attention_reference` for pools that may be quantized (K and V formats may differ).

    Args:
        q: [B, n_heads, 1, head_dim].
        k_pool, v_pool: an array [num_blocks, n_kv_heads, block_size, head_dim] or a `QuantizedPool`.
        block_tables, context_lens, scale, max_len: as in `paged_attention_reference`.
    Returns:
        [B, n_heads, 1, head_dim] in q's dtype.
    """
    B, nb = block_tables.shape
    d = q.shape[-1]
    k = _gather_blocks(k_pool, block_tables, d)
    v = _gather_blocks(v_pool, block_tables, d)
    tables = mx.arange(B * nb, dtype=mx.int32).reshape(B, nb)  # the gathered blocks, in table order
    return paged_attention_reference(q, k, v, tables, context_lens, scale, max_len)
