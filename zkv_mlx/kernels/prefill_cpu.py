"""The CPU backend's prefill attention: GEMMs in MLX, the softmax's exponentials in numpy, in place.

On x86 MLX's CPU backend has no SIMD `exp`: its fused `mx.softmax` costs ~14 ns a score here, numpy's vectorised
`np.exp` ~1 ns, and the softmax over the [L, kv_len] scores is what grows with the context in a long prefill.
So each query tile's scores are evaluated by MLX (OpenBLAS GEMM), exponentiated in place through numpy's
zero-copy view of that buffer (the array is fresh, evaluated and referenced only here), multiplied by V in MLX,
and the output rows are divided by their sums afterwards ([L, D] divisions instead of [L, kv_len]).
The next tile's scores are evaluated asynchronously while numpy works on the current one.

Tiles, windows and sinks as in `prefill.py` (which chooses this path); the sink joins each row's max and sum.
"""

from __future__ import annotations

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
