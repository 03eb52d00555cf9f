"""The CPU backend's prefill attention: GEMMs in MLX, the softmax's exponentials in numpy, in place.

On x86 MLX's CPU backend has no SIMD `exp`: its fused `mx.softmax` costs ~14 ns a score here, numpy's vectorised
`np.exp` ~1 ns, and the softmax over the [L, kv_len] scores is what grows with the context in a long prefill.
So each query tile's scores are evaluated by MLX (OpenBLAS GEMM), exponentiated in place through numpy's
zero-copy view of that buffer (the array is fresh, evaluated and referenced only here), multiplied by V in MLX,
and the output rows are divided by their sums afterwards ([L, D] divisions instead of [L, kv_len]).
The next tile's scores are evaluated asynchronously while numpy works on the current one.

Tiles, windows and sinks as in `prefill.py` (which chooses this path); the sink joins each row's max and sum.
`paged_chunk_attention` does the same for a short chunk (a prefix hit's new suffix) straight from the pool's blocks
(`models/attention.py` chooses it).
"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np


def tiled_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mass_out: list | None,
                    window: int | None, sinks: mx.array | None, tile: int) -> mx.array:
    """Same contract as `prefill.prefill_attention` for float32 q (checked there); evaluates as it goes.

    Args:
        q: [1, n_heads, L, D] float32; k, v: [1, n_kv_heads, kv_len, D]; tile: query rows per tile.
    Returns:
        [1, n_heads, L, D] float32.
    """
    _, hq, L, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    rep = hq // hkv
    k, v = k[0].astype(mx.float32), v[0].astype(mx.float32)  # [H_kv, kv_len, D]
    qs = (q[0] * scale).reshape(hkv, rep, L, d)  # query heads grouped by their kv head
    sink = None if sinks is None else np.array(sinks.astype(mx.float32)).reshape(hkv, rep, 1, 1)
    spans = []
    for t0 in range(0, L, tile):
        a, t = lk - L + t0, min(tile, L - t0)
        spans.append((t0, a, t, 0 if window is None else max(0, a - window + 1), a + t))

    def scores(i):
        t0, _, t, lo, hi = spans[i]
        s = qs[:, :, t0:t0 + t].reshape(hkv, rep * t, d) @ k[:, lo:hi].swapaxes(-1, -2)  # [H_kv, rep*t, span]
        mx.async_eval(s)
        return s

    outs, mass = [], None
    nxt = scores(0)
    for i, (t0, a, t, lo, hi) in enumerate(spans):
        s = nxt
        if i + 1 < len(spans):
            nxt = scores(i + 1)  # computed by MLX's thread while numpy works on this tile
        mx.eval(s)
        sn = np.asarray(s).reshape(hkv, rep, t, hi - lo)  # a view of s's buffer: written in place below
        inv = _exp_rows(sn, a, t, lo, window, sink)  # s now holds exp(score - row max)
        inv_mx = mx.array(inv.reshape(hkv, rep * t, 1))
        outs.append(((s @ v[:, lo:hi]) * inv_mx).reshape(hkv, rep, t, d))
        if mass_out is not None:
            m = (inv_mx.swapaxes(-1, -2) @ s).sum(axis=(0, 1))  # sum over heads and rows of the probabilities
            m = mx.pad(m, (lo, lk - hi))
            mass = m if mass is None else mass + m
    if mass_out is not None:
        mass_out.append(mass)
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
    return out.reshape(1, hq, L, d)


def _exp_rows(sn: np.ndarray, a: int, t: int, lo: int, window: int | None, sink: np.ndarray | None) -> np.ndarray:
    """In place: masks sn's invisible scores, then sn = exp(sn - row max). Returns 1 / row sum [H_kv, rep, t, 1].

    sn: [H_kv, rep, t, span] float32 scores of the queries at cache indices [a, a + t) over keys [lo, lo + span).
    """
    span = sn.shape[-1]
    for c0, c1 in edges(a, t, lo, span, window):
        np.copyto(sn[..., c0:c1], -np.inf, where=~visible(a, t, lo + c0, lo + c1, window))
    m = sn.max(axis=-1, keepdims=True)
    if sink is not None:
        m = np.maximum(m, sink)
    sn -= m
    np.exp(sn, out=sn)
    total = sn.sum(axis=-1, keepdims=True)
    if sink is not None:
        total += np.exp(sink - m)  # the sink's share of the denominator (it has no value)
    return 1.0 / total


def edges(a: int, t: int, lo: int, span: int, window: int | None) -> list[tuple[int, int]]:
    """Key columns [c0, c1) of a tile that hold invisible scores (relative to lo).

    The causal triangle at the end (t > 1), and under a window the band at the start that the first rows still
    see and later ones do not; when the two meet, the whole span.
    """
    out = [(span - t, span)] if t > 1 else []
    band = 0 if window is None else a + t - window - lo
    if band > 0:
        out = [(0, span)] if band >= span - t else [(0, band)] + out
    return out


def visible(a: int, t: int, c0: int, c1: int, window: int | None) -> np.ndarray:
    """[t, c1 - c0] bool: query a + r sees key c0 + c (causal, and inside the window if any)."""
    i = np.arange(a, a + t)[:, None]
    j = np.arange(c0, c1)[None, :]
    vis = j <= i
    return vis if window is None else vis & (j > i - window)


# -- a short chunk over a sequence's cached blocks, read from the pool ---------------------------------------------

# Rows of scores exponentiated per numpy pass: ~512 KB of float32, so a block's max, subtract, exp and sum run
# from the core's L2 instead of streaming the whole [rows, kv_len] scores from memory four times.
_CHUNK_BYTES = 512 * 1024


def paged_chunk_attention(q: mx.array, k_pool: mx.array, v_pool: mx.array, runs: list[tuple[int, int]],
                          block_ids: list[int], length: int, scale: float) -> mx.array:
    """Causal attention of a chunk of L new queries over one sequence's first `length` cache rows in the pool.

    For a short chunk over a long cached prefix (a prefix hit plus a new suffix): each kv head's keys and values
    are read once from the pool's blocks (contiguous runs of block ids are slices of the pool: one copy into the
    [kv_len, D] layout the GEMMs need, no gather of the block ids first; many scattered blocks are gathered), the
    causal mask is applied only to the last L columns (the chunk's own triangle), and the softmax's exponentials
    are numpy's, in place, row block by row block (see the module docstring for why). For a float32 pool the
    copies are numpy's too, into two buffers this thread reuses (`_copied_heads`: ~0.64 vs ~1.05 ms a layer for
    4128 rows here); then the layer syncs three times (pool writes, scores, output: the buffers are free again on
    return), else once. (Computing one kv head's scores while numpy works on the previous one, as
    `tiled_attention` does with tiles, measured ~11% slower here.)

    Args:
        q: [1, n_heads, L, D] rotated queries of cache indices [length - L, length) (their K/V rows written).
        k_pool, v_pool: the layer's float pool arrays [num_blocks, n_kv_heads, block_size, D].
        runs: contiguous runs (first id, count) of the block ids covering the `length` rows
            (`reference.decode_plan(...)[0]`); block_ids: those block ids (used when the runs are many).
        length: cache rows to attend over, the chunk's own included; scale: softmax scale.
    Returns:
        [1, n_heads, L, D] in q's dtype (accumulated in float32).
    """
    _, hq, L, d = q.shape
    hkv = k_pool.shape[1]
    rep = hq // hkv
    k, v, reused = _copied_heads(k_pool, v_pool, runs, block_ids, length)  # [H_kv, length, D] each
    qs = (q[0].astype(mx.float32) * scale).reshape(hkv, rep * L, d)  # query heads grouped by their kv head
    s = qs @ k.swapaxes(-1, -2)  # [H_kv, rep * L, length]
    mx.eval(s)
    sn = np.asarray(s)  # a view of s's buffer: written in place below
    inv = np.stack([_causal_exp_rows(sn[h], L) for h in range(hkv)])  # s now holds exp(score - row max)
    out = ((s @ v) * mx.array(inv)).reshape(1, hq, L, d).astype(q.dtype)  # [H_kv, rep * L, D] -> [1, H, L, D]
    if reused:
        mx.eval(out)  # the next call overwrites the buffers v is read from
    return out


# Reused copy buffers per thread up to this size (K and V together); larger contexts allocate per call.
_MAX_BUFFER_BYTES = 256 << 20
_LOCAL = threading.local()


def _copied_heads(k_pool: mx.array, v_pool: mx.array, runs: list[tuple[int, int]], block_ids: list[int],
                  length: int) -> tuple[mx.array, mx.array, bool]:
    """K and V [H_kv, length, D] float32 of one sequence, copied from the pool into the GEMM layout.

    A float32 pool whose blocks form few runs is copied by numpy (its strided copy runs ~1.6x MLX's general one
    here) into two buffers kept per thread and reused while they are large enough; this first evaluates the
    pool arrays (the chunk's own rows are written lazily). Other pools go through `_heads` (MLX copies).

    Returns:
        (K, V, reused): reused is True when K and V are views of this thread's buffers, which the next call
        overwrites: whatever reads them must be evaluated before then.
    """
    _, h, bs, d = k_pool.shape
    nb = -(-length // bs)
    if k_pool.dtype != mx.float32 or len(runs) > _MAX_RUNS or 2 * h * nb * bs * d * 4 > _MAX_BUFFER_BYTES:
        return _heads(k_pool, runs, block_ids, length), _heads(v_pool, runs, block_ids, length), False
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None or bufs[0].shape[0] != h or bufs[0].shape[2] != d or bufs[0].shape[1] < nb * bs:
        rows = -(-nb * bs // 1024) * 1024  # room for a few more hits' suffixes before growing
        bufs = _LOCAL.bufs = [mx.zeros((h, rows, d), dtype=mx.float32) for _ in range(2)]
    mx.eval(k_pool, v_pool, bufs)
    for pool, buf in zip((k_pool, v_pool), bufs):
        src = np.asarray(pool)  # [num_blocks, H, BS, D] view, read only
        dst = np.asarray(buf)[:, :nb * bs].reshape(h, nb, bs, d)  # view of the buffer: written here
        i = 0
        for a, n in runs:
            np.copyto(dst[:, i:i + n], src[a:a + n].swapaxes(0, 1))
            i += n
    return bufs[0][:, :length], bufs[1][:, :length], True


def _heads(pool: mx.array, runs: list[tuple[int, int]], block_ids: list[int], length: int) -> mx.array:
    """[H_kv, length, D] float32: one sequence's rows of every kv head, from pool slices (one copy)."""
    _, h, bs, d = pool.shape
    nb = -(-length // bs)
    if len(runs) > _MAX_RUNS:  # scattered blocks: one gather beats many small slices
        x = mx.take(pool.swapaxes(0, 1), mx.array(block_ids[:nb], dtype=mx.int32), axis=1)
    elif len(runs) == 1:
        a, _ = runs[0]
        x = pool[a:a + nb].swapaxes(0, 1)
    else:  # [H, nb, BS, D] written once by the concatenation
        x = mx.concatenate([pool[a:a + n].swapaxes(0, 1) for a, n in runs], axis=1)
    return x.astype(mx.float32).reshape(h, nb * bs, d)[:, :length]


_MAX_RUNS = 8


def _causal_exp_rows(sn: np.ndarray, L: int) -> np.ndarray:
    """In place: masks the chunk's causal triangle, then each row = exp(row - row max). Returns 1 / row sums.

    sn: [rep * L, kv_len] float32 scores; row r is query r % L of the chunk, at cache index kv_len - L + r % L,
    which sees the keys up to and including its own. Returns float32 [rep * L, 1].
    """
    rows, n = sn.shape
    tri = sn.reshape(rows // L, L, n)[..., n - L:]
    np.copyto(tri, -np.inf, where=~np.tri(L, dtype=bool))
    step = max(1, _CHUNK_BYTES // (4 * n))
    inv = np.empty((rows, 1), np.float32)
    for r0 in range(0, rows, step):
        blk = sn[r0:r0 + step]
        np.subtract(blk, blk.max(axis=1, keepdims=True), out=blk)
        np.exp(blk, out=blk)
        inv[r0:r0 + step, 0] = blk.sum(axis=1)
    return np.reciprocal(inv, out=inv)
