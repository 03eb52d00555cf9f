"""The decode attention of main before w/dattn9 (commit 4c0cc82's `reference.single_decode_attention`), kept
verbatim for the A/B scripts ab_decode_attn_layer.py and ab_decode_attn_runner.py. Not used by the engine."""

from __future__ import annotations

import mlx.core as mx

from zkv_mlx.kernels.decode_cpu import decode_plan
from zkv_mlx.kernels.reference import _exp_inline
from zkv_mlx.kernels.window import check_sinks, sink_softmax

_MAX_RUNS = 8


def _bounds(length, bs, window, first):
    # what 4c0cc82's decode_plan returned as its second item (built once per step there)
    lo = 0 if window is None else max(0, length - window) - first * bs
    return mx.array([lo, length - first * bs], dtype=mx.int32)


def old_single_decode_attention(q: mx.array, k_pool: mx.array, v_pool: mx.array, block_table: list[int],
                            length: int, scale: float, mass_out: list | None = None,
                            plan: tuple | None = None, *, window: int | None = None,
                            sinks: mx.array | None = None) -> mx.array:
    """Decode attention for one sequence, reading its K/V blocks once (CPU-friendly reference).

    The pool layout [num_blocks, H_kv, BS, D] keeps a sequence's rows for one head non-contiguous, so instead
    of copying K/V into [H_kv, L, D] this treats each (block, kv head) as one small matrix of a batched matmul
    over pool slices read in place: scores [n, H_kv, rep, BS] = q grouped by kv head [1, H_kv, rep, D] @ K^T
    (no wasted products of a query head with another head's keys), one softmax over all blocks' positions
    (the fast exp: exp is the costly op on the CPU), then (P @ V) summed over the blocks. Contiguous runs of
    block ids are slices of the pool, so K/V are never copied; many scattered blocks are gathered instead.
    With a window only the blocks it touches are read (earlier entries of block_table are never used). The
    result depends only on this sequence, so it is the same alone as in any batch.

    Args:
        q: [1, n_heads, 1, D]; k_pool, v_pool: the layer's pool arrays.
        block_table: the sequence's block ids (python ints). length: valid positions (incl. this token).
        mass_out: if a list, gets the attention mass per block [nb] (float32, summed over the query heads;
            0 for blocks before the window).
        plan: `decode_plan(block_table, length, block_size, window)`, computed once per step for all layers.
        window: sliding window W (the last W positions are visible), None = all.
        sinks: float32 [n_heads] attention-sink logits, or None.
    Returns:
        [1, n_heads, 1, D] in q's dtype.
    """
    _, h_kv, bs, d = k_pool.shape
    n_heads = q.shape[1]
    rep = n_heads // h_kv
    check_sinks(sinks, n_heads)
    runs, _, first = plan or decode_plan(block_table, length, bs, window)
    bounds = plan[3] if plan and len(plan) > 3 else _bounds(length, bs, window, first)
    nb = -(-length // bs) - first  # blocks read
    if len(runs) > _MAX_RUNS:  # scattered blocks: one gather beats many small slices
        idx = mx.array(block_table[first:first + nb], dtype=mx.int32)
        parts = [(k_pool[idx], v_pool[idx], nb)]
    else:  # slices of the pool: no copy of K/V
        parts = [(k_pool[a:a + n], v_pool[a:a + n], n) for a, n in runs]
    qh = (q.reshape(1, h_kv, rep, d) * scale)  # query heads grouped by their kv head
    # every (block, kv head) pair: [n, H_kv, rep, BS]
    scores = [qh @ k.astype(q.dtype).swapaxes(-1, -2) for k, _, n in parts]
    s = scores[0] if len(scores) == 1 else mx.concatenate(scores, axis=0)
    if sinks is None:
        p = _decode_probs(s, bounds)  # [nb, H_kv, rep, BS] float32
    else:  # query head kvh * rep + r
        p = _decode_probs_sinks(s, bounds, sinks.astype(mx.float32).reshape(1, h_kv, rep, 1))
    if mass_out is not None:
        mass = p.sum(axis=(1, 2, 3))
        mass_out.append(mass if not first else mx.pad(mass, (first, 0)))
    p = p.astype(q.dtype)
    out, start = None, 0
    for _, v, n in parts:
        o = (p[start:start + n] @ v.astype(q.dtype)).sum(axis=0)  # [H_kv, rep, D]
        out = o if out is None else out + o
        start += n
    return out.reshape(1, n_heads, 1, d)

def _block_probs(s: mx.array, bounds: mx.array, sinks: mx.array | None) -> mx.array:
    # s: [n, H_kv, rep, BS] -> float32 probabilities over the n * BS positions, those outside [lo, hi) masked
    n, _, _, bs = s.shape
    s = s.astype(mx.float32)
    pos = (mx.arange(n)[:, None] * bs + mx.arange(bs)[None, :])[:, None, None, :]
    s = mx.where((pos < bounds[1]) & (pos >= bounds[0]), s, -float("inf"))
    return sink_softmax(s, sinks, _exp_inline, axis=(0, 3))


@mx.compile
def _decode_probs(s: mx.array, bounds: mx.array) -> mx.array:
    """Softmax of [n, H_kv, rep, BS] scores over the positions (axes 0 and 3) in [bounds[0], bounds[1])
    (one fused graph per shape)."""
    return _block_probs(s, bounds, None)


@mx.compile
def _decode_probs_sinks(s: mx.array, bounds: mx.array, sinks: mx.array) -> mx.array:
    """`_decode_probs` with sink logits [1, H_kv, rep, 1] in the denominator."""
    return _block_probs(s, bounds, sinks)
