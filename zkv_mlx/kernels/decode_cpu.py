"""Decode attention of one long sequence over the paged pool, read in place (the CPU path; issue #20).

`single_decode_attention` is the engine's decode attention for sequences longer than `GROUPED_MAX_LEN` (and for a
1-token prefill chunk). Per step `decode_plan` turns a sequence's block table into contiguous runs of pool blocks
(slices of the pool: K/V are never copied) and a visibility mask, once for all layers. Per layer:

- scores: every (block, kv head) pair is one small matrix of a batched matmul over the pool slices,
  [1, H_kv, rep, D] @ K^T -> [n, H_kv, rep, BS] (no product of a query head with another head's keys);
- one compiled kernel group (`_partial_probs`): scale, mask, max, the fast exp and the sum (flash-decoding's
  partial softmax: un-normalised weights, their max and sum per query head);
- (weights @ V) summed over the blocks, and the normalisation applied to the [n_heads, D] output only.

The result depends only on the sequence, so it is the same alone as in any batch. (Splitting the blocks over two
MLX CPU streams, flash-decoding style, was 1.4x faster in isolation at 8192 but slower inside the model step:
docs/benchmarks.md, "Issue #20 (w/dattn9)".)
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .window import check_sinks, check_window, first_block

_LOG2E = 1.4426950408889634
# 2^f on [-0.5, 0.5]: Taylor series of e^(f ln 2) to degree 6 (relative error < 3e-7 after range reduction).
_C = (1.0, 0.6931471805599453, 0.2402265069591007, 0.05550410866482158, 0.009618129107628477,
      0.0013333558146428443, 0.00015403530393381606)
_MAGIC = 12582912.0  # 1.5 * 2^23: y + _MAGIC holds round(y) in its low mantissa bits (|y| < 2^22)
_MAX_RUNS = 8  # more contiguous runs than this: the blocks are gathered (one copy) instead of sliced


def decode_plan(block_table: list[int], length: int, block_size: int, window: int | None = None) -> tuple:
    """What `single_decode_attention` derives from a table, length and window (once per step for all layers).

    Returns:
        (contiguous runs [(first block id, count), ...] of the blocks read, bool [nb, 1, 1, BS] visibility of
        their positions, index in block_table of the first block read).
    """
    check_window(window)
    first = first_block(length, window, block_size)
    lo = 0 if window is None else max(0, length - window) - first * block_size
    nb = -(-length // block_size) - first
    pos = np.arange(nb * block_size)
    visible = mx.array(((pos >= lo) & (pos < length - first * block_size)).reshape(nb, 1, 1, block_size))
    return _runs(block_table[first: first + nb]), visible, first


def single_decode_attention(q: mx.array, k_pool: mx.array, v_pool: mx.array, block_table: list[int],
                            length: int, scale: float, mass_out: list | None = None,
                            plan: tuple | None = None, *, window: int | None = None,
                            sinks: mx.array | None = None) -> mx.array:
    """Decode attention for one sequence, reading its K/V blocks once, in place (see the module docstring).

    With a window only the blocks it touches are read (earlier entries of block_table are never used).

    Args:
        q: [1, n_heads, 1, D] rotated query; k_pool, v_pool: the layer's pool arrays [num_blocks, H_kv, BS, D].
        block_table: the sequence's block ids (python ints). length: valid positions (incl. this token).
        scale: softmax scale.
        mass_out: if a list, gets the attention mass per block [nb] (float32, summed over the query heads;
            0 for blocks before the window).
        plan: `decode_plan(block_table, length, block_size, window)`, computed once per step for all layers.
        window: sliding window W (the last W positions are visible), None = all.
        sinks: float32 [n_heads] attention-sink logits, or None.
    Returns:
        [1, n_heads, 1, D] in q's dtype.
    Raises:
        ValueError: a bad window or sinks shape (`window.check_window`, `window.check_sinks`).
    """
    _, h_kv, bs, d = k_pool.shape
    n_heads = q.shape[1]
    rep = n_heads // h_kv
    check_sinks(sinks, n_heads)
    runs, visible, first = plan or decode_plan(block_table, length, bs, window)
    nb = visible.shape[0]
    if len(runs) > _MAX_RUNS:  # scattered blocks: one gather beats many small slices
        runs = [(0, nb)]
        idx = mx.array(block_table[first:first + nb], dtype=mx.int32)
        k_pool, v_pool = k_pool[idx], v_pool[idx]
    qh = q.reshape(1, h_kv, rep, d)  # query heads grouped by their kv head
    sk = None if sinks is None else sinks.astype(mx.float32).reshape(1, h_kv, rep, 1)
    e, out, l = _weighted(qh, k_pool, v_pool, runs, visible, scale, sk, q.dtype)
    if mass_out is not None:  # h2o: the normalised weights summed per block
        mass = (e / l).sum(axis=(1, 2, 3))
        mass_out.append(mass if not first else mx.pad(mass, (first, 0)))
    return (out / l[0]).astype(q.dtype).reshape(1, n_heads, 1, d)


def _weighted(qh, k_pool, v_pool, runs, visible, scale: float, sinks, dtype):
    """Un-normalised attention of the query heads [1, H_kv, rep, D] over the runs of blocks.

    Returns:
        (weights [n, H_kv, rep, BS] float32, out [H_kv, rep, D] = weights @ V summed over the blocks,
        the softmax denominator per query head [1, H_kv, rep, 1]: the weights' sum plus the sink's term).
    """
    kv = [(k_pool[a:a + n], v_pool[a:a + n]) for a, n in runs]
    scores = [qh @ k.astype(dtype).swapaxes(-1, -2) for k, _ in kv]
    s = scores[0] if len(scores) == 1 else mx.concatenate(scores, axis=0)
    e, l = _exp_weights(s, visible, scale) if sinks is None else _exp_weights_sinks(s, visible, scale, sinks)
    out, start = None, 0
    for (a, n), (_, v) in zip(runs, kv):
        o = (e[start:start + n].astype(dtype) @ v.astype(dtype)).sum(axis=0)  # [H_kv, rep, D]
        out = o if out is None else out + o
        start += n
    return e, out, l


def _weights(s: mx.array, visible: mx.array, scale: float, sinks: mx.array | None):
    # s: [n, H_kv, rep, BS] unscaled scores -> (exp(s * scale - m), 0 where not visible; their sum per query head
    # plus exp(sink - m)), m = the max of the visible scaled scores (and the sink): as window.sink_softmax
    s = mx.where(visible, s.astype(mx.float32) * scale, -float("inf"))
    m = s.max(axis=(0, 3), keepdims=True)
    if sinks is not None:
        m = mx.maximum(m, sinks)
    e = _exp_fast(s - m)
    l = e.sum(axis=(0, 3), keepdims=True)
    return e, (l if sinks is None else l + _exp_fast(sinks - m))


@mx.compile
def _exp_weights(s: mx.array, visible: mx.array, scale: float):
    """`_weights` without sinks (one compiled graph per shape and scale)."""
    return _weights(s, visible, scale, None)


@mx.compile
def _exp_weights_sinks(s: mx.array, visible: mx.array, scale: float, sinks: mx.array):
    """`_weights` with sink logits [1, H_kv, rep, 1]."""
    return _weights(s, visible, scale, sinks)


def _exp_fast(x: mx.array) -> mx.array:
    # exp(x) for x <= 0 (-inf -> 0) as 2^n * 2^f: n = round(x log2 e) by the magic-number add (no rounding op and
    # no float -> int conversion in the fused kernel), 2^f by _C's polynomial. Inside mx.compile'd functions.
    y = mx.maximum(x * _LOG2E, -127.0)
    t = y + _MAGIC
    f = y - (t - _MAGIC)
    p = _C[6]
    for c in _C[5::-1]:
        p = p * f + c
    return p * mx.view((mx.view(t, mx.int32) - (0x4B400000 - 127)) << 23, mx.float32)


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Splits block ids into ascending contiguous runs: [(first id, count), ...]."""
    runs = []
    for b in ids:
        if runs and b == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return [(a, n) for a, n in runs]
