"""Pure-MLX reference attention over the paged pool (design.md §3-4).

Every kernel variant is checked against these functions; on Linux (and whenever Metal is unavailable or
disabled) they are the production path.
"""

from __future__ import annotations

import mlx.core as mx


def paged_attention_reference(q: mx.array, k_pool: mx.array, v_pool: mx.array, block_tables: mx.array,
                              context_lens: mx.array, scale: float, max_len: int | None = None) -> mx.array:
    """Decode attention: one query token per sequence over its paged K/V.

    Args:
        q: [B, n_heads, 1, head_dim] queries (rope applied).
        k_pool, v_pool: [num_blocks, n_kv_heads, block_size, head_dim].
        block_tables: [B, max_blocks] int32 (rows padded with any valid block id).
        context_lens: [B] int32 number of valid positions per sequence (including the current token).
        scale: softmax scale.
        max_len: max(context_lens) if the caller knows it (saves a device sync).
    Returns:
        [B, n_heads, 1, head_dim] in q's dtype.
    """
    B, nb = block_tables.shape
    _, h_kv, bs, d = k_pool.shape
    # [B, nb, H, BS, D] -> [B, H, nb*BS, D]
    k = k_pool[block_tables].transpose(0, 2, 1, 3, 4).reshape(B, h_kv, nb * bs, d)
    v = v_pool[block_tables].transpose(0, 2, 1, 3, 4).reshape(B, h_kv, nb * bs, d)
    if max_len is None:
        max_len = int(context_lens.max().item())
    k, v = k[:, :, :max_len], v[:, :, :max_len]
    if B == 1:
        mask = None  # the slice already is the whole valid context
    else:
        # [B, 1, 1, L]: True where the position belongs to the sequence
        mask = (mx.arange(max_len)[None, :] < context_lens[:, None])[:, None, None, :]
    return mx.fast.scaled_dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=scale, mask=mask)


def prefill_attention_reference(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal attention of L new queries over all kv_len positions of one sequence (new ones last).

    Args:
        q: [1, n_heads, L, head_dim]; k, v: [1, n_kv_heads, kv_len, head_dim] gathered from the pool.
    Returns:
        [1, n_heads, L, head_dim].
    """
    mask = "causal" if q.shape[2] > 1 else None  # MLX aligns the causal mask to the bottom-right
    return mx.fast.scaled_dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=scale, mask=mask)
