"""Pure-MLX reference decode attention over pools in any KV format (float, `mx.quantize` triples, or keys per
channel with their tail and sink rows)."""

from __future__ import annotations

import mlx.core as mx

from .kv_format import ChannelKeyPool, is_quantized, pool_format
from .kv_quant import dequantize_channels
from .reference import paged_attention_reference
from .reference_mass import attention_mass


def _gather_blocks(pool, block_tables: mx.array, head_dim: int) -> mx.array:
    # [B, nb] block ids -> [B * nb, H, BS, D], dequantized where needed
    ids = block_tables.reshape(-1)
    if not is_quantized(pool):
        return pool[ids]
    fmt = pool_format(pool, head_dim)
    packed, scales, biases = pool
    return mx.dequantize(packed[ids], scales[ids], biases[ids], group_size=fmt.group_size, bits=fmt.bits)


def _gather_channel_keys(pool: ChannelKeyPool, block_tables: mx.array, context_lens: mx.array,
                         head_dim: int) -> mx.array:
    """The keys of every block-table entry as `KVPool.gather` reads them: [B * nb, H, BS, D] in the tail dtype.

    Quantized blocks are dequantized per channel; a sequence's last block comes from the tail slab when it has a
    tail slot; positions < n_sinks come from the sink slab when the sequence's first block has a sink slot.
    """
    B, nb = block_tables.shape
    bits = pool_format(pool, head_dim).bits
    dtype = pool.tail.dtype
    ids = block_tables.reshape(-1)
    k = dequantize_channels(pool.packed[ids], pool.scales[ids], pool.biases[ids], bits, dtype)
    h, bs = k.shape[1], k.shape[2]
    last = (context_lens.astype(mx.int32) - 1) // bs  # [B]: the block holding the last position
    tail_slot = pool.slots[ids, 0].reshape(B, nb)
    use_tail = (mx.arange(nb)[None, :] == last[:, None]) & (tail_slot >= 0)
    tail = pool.tail[mx.maximum(tail_slot, 0).reshape(-1)]
    k = mx.where(use_tail.reshape(-1)[:, None, None, None], tail, k)
    if pool.n_sinks and pool.sinks.ndim == 4:
        n = min(pool.n_sinks, nb * bs)
        sink_slot = pool.slots[block_tables[:, 0], 1]  # [B]
        rows = pool.sinks[mx.maximum(sink_slot, 0)][:, :, :n]  # [B, H, n, D]
        rows = mx.pad(rows, [(0, 0), (0, 0), (0, nb * bs - n), (0, 0)])
        seq = k.reshape(B, nb, h, bs, head_dim).transpose(0, 2, 1, 3, 4).reshape(B, h, nb * bs, head_dim)
        take = (mx.arange(nb * bs)[None, :] < n) & (sink_slot >= 0)[:, None]  # [B, nb*BS]
        seq = mx.where(take[:, None, :, None], rows, seq)
        k = seq.reshape(B, h, nb, bs, head_dim).transpose(0, 2, 1, 3, 4).reshape(B * nb, h, bs, head_dim)
    return k


def paged_attention_reference_quantized(q: mx.array, k_pool, v_pool, block_tables: mx.array,
                                        context_lens: mx.array, scale: float,
                                        max_len: int | None = None, return_mass: bool = False):
    """`paged_attention_reference` for pools that may be quantized (K and V formats may differ).

    Args:
        q: [B, n_heads, 1, head_dim].
        k_pool: an array [num_blocks, n_kv_heads, block_size, head_dim], a `QuantizedPool` or a `ChannelKeyPool`.
        v_pool: an array or a `QuantizedPool`.
        block_tables, context_lens, scale, max_len: as in `paged_attention_reference`.
        return_mass: also return the attention mass per block-table entry (`reference_mass.attention_mass`).
    Returns:
        [B, n_heads, 1, head_dim] in q's dtype; with return_mass, (that, [B, max_blocks] float32).
    """
    B, nb = block_tables.shape
    d = q.shape[-1]
    if isinstance(k_pool, ChannelKeyPool):
        k = _gather_channel_keys(k_pool, block_tables, context_lens, d)
    else:
        k = _gather_blocks(k_pool, block_tables, d)
    v = _gather_blocks(v_pool, block_tables, d)
    tables = mx.arange(B * nb, dtype=mx.int32).reshape(B, nb)  # the gathered blocks, in table order
    out = paged_attention_reference(q, k, v, tables, context_lens, scale, max_len)
    if not return_mass:
        return out
    return out, attention_mass(q, k, tables, context_lens, scale)
