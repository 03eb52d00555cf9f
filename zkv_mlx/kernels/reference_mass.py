"""Reference attention mass per block-table entry (what the H2O eviction policy ranks blocks by)."""

from __future__ import annotations

import mlx.core as mx


def attention_mass(q: mx.array, k_pool: mx.array, block_tables: mx.array, context_lens: mx.array,
                   scale: float, *, lo: mx.array | None = None, sinks: mx.array | None = None) -> mx.array:
    """Softmax probability mass of each block-table entry, summed over the query heads, in float32.

    Args:
        q: [B, n_heads, 1, head_dim]; k_pool: float [num_blocks, n_kv_heads, block_size, head_dim];
        block_tables: [B, max_blocks]; context_lens: [B]; scale: softmax scale.
        lo: [B] int32 first visible position per sequence (a sliding window), None = 0.
        sinks: float32 [n_heads] attention-sink logits (in the softmax's denominator), or None.
    Returns:
        [B, max_blocks] float32: mass[b, j] = sum over heads h and positions t < context_lens[b] of block-table
        entry j of softmax_h(t), lo[b] <= t. Entries past a sequence's length or before its window are 0; each
        row sums to n_heads without sinks (less with them; 0 for an empty context).
    """
    B, nb = block_tables.shape
    _, h_kv, bs, d = k_pool.shape
    n_heads = q.shape[1]
    # [B, nb, H, BS, D] -> [B, H, nb*BS, D]
    k = k_pool[block_tables].astype(mx.float32).transpose(0, 2, 1, 3, 4).reshape(B, h_kv, nb * bs, d)
    qg = (q.astype(mx.float32) * scale).reshape(B, h_kv, n_heads // h_kv, d)
    s = qg @ k.swapaxes(-1, -2)  # [B, H_kv, rep, nb*BS]
    valid = (mx.arange(nb * bs)[None, :] < context_lens.astype(mx.int32)[:, None])[:, None, None, :]
    if lo is not None:
        valid = valid & (mx.arange(nb * bs)[None, :] >= lo.astype(mx.int32)[:, None])[:, None, None, :]
    s = mx.where(valid, s, -float("inf"))
    m = s.max(axis=-1, keepdims=True)
    den = 0.0
    if sinks is not None:
        sk = sinks.astype(mx.float32).reshape(1, h_kv, n_heads // h_kv, 1)
        m = mx.maximum(m, sk)
        den = mx.exp(sk - m)
    m = mx.where(m == -float("inf"), 0.0, m)  # empty context: every e is 0
    e = mx.exp(s - m)
    p = e / mx.maximum(e.sum(axis=-1, keepdims=True) + den, 1e-30)
    return p.reshape(B, n_heads, nb, bs).sum(axis=(1, 3))
