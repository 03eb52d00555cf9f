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


def single_decode_attention(q: mx.array, k_pool: mx.array, v_pool: mx.array, block_table: list[int],
                            length: int, scale: float) -> mx.array:
    """Decode attention for one sequence, reading its K/V blocks once (CPU-friendly reference).

    The pool layout [num_blocks, H_kv, BS, D] keeps a sequence's rows for one head non-contiguous, so
    instead of copying K/V into [H_kv, L, D] this computes q against every row of the sequence's blocks in one
    GEMM (all heads: cheap here, the GEMM is bound by reading K), keeps each query head's own kv head (the
    block diagonal) before the softmax (exp is the costly op on the CPU), and multiplies V by the block-diagonal
    probabilities. When the block ids are one ascending run the blocks are a slice of the pool: no copy at all.

    Args:
        q: [1, n_heads, 1, D]; k_pool, v_pool: the layer's pool arrays.
        block_table: the sequence's block ids (python ints). length: valid positions (incl. this token).
    Returns:
        [1, n_heads, 1, D] in q's dtype.
    """
    _, h_kv, bs, d = k_pool.shape
    n_heads = q.shape[1]
    rep = n_heads // h_kv
    nb = -(-length // bs)
    ids = block_table[:nb]
    if ids[-1] - ids[0] == nb - 1 and all(b - a == 1 for a, b in zip(ids, ids[1:])):
        k, v = k_pool[ids[0] : ids[0] + nb], v_pool[ids[0] : ids[0] + nb]
    else:
        idx = mx.array(ids, dtype=mx.int32)
        k, v = k_pool[idx], v_pool[idx]
    k2 = k.reshape(nb * h_kv * bs, d).astype(q.dtype)  # rows ordered (block, head, slot)
    v2 = v.reshape(nb * h_kv * bs, d).astype(q.dtype)
    q2 = q.reshape(n_heads, d) * scale
    # scores of every query head against every row: [H_kv, rep, nb, H_kv, BS]; keep the diagonal heads
    s = (q2 @ k2.T).reshape(h_kv, rep, nb, h_kv, bs)
    s = mx.diagonal(s, 0, 0, 3).reshape(rep, nb * bs, h_kv)  # [rep, positions, H_kv]
    if length < nb * bs:
        s = mx.where((mx.arange(nb * bs) < length)[None, :, None], s, -float("inf"))
    p = mx.softmax(s.astype(mx.float32), axis=1).astype(q.dtype)
    # back to [H_kv, rep, nb, 1, BS] and spread over the block diagonal: [H_q, nb * H_kv * BS]
    p = p.reshape(rep, nb, bs, h_kv).transpose(3, 0, 1, 2)[:, :, :, None, :]
    eye = (mx.arange(h_kv)[:, None] == mx.arange(h_kv)[None, :]).astype(q.dtype).reshape(h_kv, 1, 1, h_kv, 1)
    p = (p * eye).reshape(n_heads, nb * h_kv * bs)
    return (p @ v2).reshape(1, n_heads, 1, d)


def prefill_attention_reference(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal attention of L new queries over all kv_len positions of one sequence (new ones last).

    Args:
        q: [1, n_heads, L, head_dim]; k, v: [1, n_kv_heads, kv_len, head_dim] gathered from the pool.
    Returns:
        [1, n_heads, L, head_dim].
    """
    mask = "causal" if q.shape[2] > 1 else None  # MLX aligns the causal mask to the bottom-right
    return mx.fast.scaled_dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=scale, mask=mask)
