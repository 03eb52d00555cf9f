"""Prefill attention that computes only what the causal (and sliding-window) mask leaves visible.

Queries are processed in tiles of `QUERY_TILE` rows. A tile of queries at cache indices [a, a + T) can see at most
the keys [max(0, a - W + 1), a + T): keys after the tile are never multiplied, keys before the window never read,
and the mask is applied only to the tile's edge columns (its causal triangle, and under a window its lower band),
as slices of that tile's scores; no [L, kv_len] mask is ever built. Paths: Metal -> MLX's fused
`mx.fast.scaled_dot_product_attention`; CPU -> `prefill_cpu.tiled_attention` (numpy's vectorised exp on the
scores, the cost that grows with the context); a few queries on the CPU -> `_tiled`, one lazy MLX graph.

Windows follow mlx-lm's `RotatingKVCache(max_size=W)`: the query at cache index i sees the keys (i - W, i].
Attention sinks follow gpt-oss / `mx.fast.scaled_dot_product_attention(..., sinks=)`: one logit per query head
joins the softmax's denominator with no value. In `_tiled` it is folded into the score GEMM: q gets one more
column holding its head's sink logit and the keys one more row (0, ..., 0, 1), whose value row is zero.
"""

from __future__ import annotations

import mlx.core as mx

from .prefill_cpu import edges, tiled_attention, visible

# Query rows per tile: the causal triangle computed and then masked is T/2 per query row (on top of the visible
# keys), and each tile costs a handful of ops; 128 keeps both small at the engine's 512-token chunks.
QUERY_TILE = 128
# From this many queries the CPU path evaluates tile by tile with numpy's exp (`prefill_cpu`); fewer (decode
# through this function, the last token of a prefix hit) stay one lazy MLX graph with no device sync.
NUMPY_MIN_QUERIES = 8


def prefill_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mass_out: list | None = None, *,
                      window: int | None = None, sinks: mx.array | None = None) -> mx.array:
    """Causal attention of L new queries over all kv_len positions of one sequence (the new ones last).

    Args:
        q: [1, n_heads, L, head_dim]; query i is at cache index kv_len - L + i.
        k, v: [1, n_kv_heads, kv_len, head_dim] (n_heads a multiple of n_kv_heads: GQA of any ratio).
        scale: softmax scale.
        mass_out: if a list, gets the attention mass per key position [kv_len] (float32, summed over the query
            heads and the L queries; the sink's share is not a position and is left out).
        window: sliding window W (mlx-lm RotatingKVCache(max_size=W)): query at cache index i sees (i - W, i].
        sinks: [n_heads] float32 attention-sink logits, one per query head (gpt-oss).
    Returns:
        [1, n_heads, L, head_dim] in q's dtype (accumulated in float32 on the CPU path).
    Raises:
        ValueError: a batch other than 1, L > kv_len, heads that do not group, window < 1 or sinks of the wrong
            shape (the message names the value).
    """
    _check(q, k, window, sinks)
    if _on_gpu():
        if mass_out is None:
            return _fused(q, k, v, scale, window, sinks)
    elif q.shape[2] >= NUMPY_MIN_QUERIES:
        out = tiled_attention(q.astype(mx.float32), k, v, scale, mass_out, window, sinks, QUERY_TILE)
        return out.astype(q.dtype)
    out = _tiled(q.astype(mx.float32), k, v, scale, mass_out, window, sinks)
    return out.astype(q.dtype)


def _on_gpu() -> bool:
    return mx.metal.is_available() and mx.default_device() == mx.gpu


def _check(q, k, window, sinks) -> None:
    if q.shape[0] != 1 or k.shape[0] != 1:
        raise ValueError(f"prefill attention takes one sequence: q batch {q.shape[0]}, k batch {k.shape[0]}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"{q.shape[2]} queries over {k.shape[2]} keys: the queries' own keys must be included")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not group over {k.shape[1]} kv heads")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r}: must be a positive integer or None")
    if sinks is not None and tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"sinks of shape {tuple(sinks.shape)}: need one logit per query head ({q.shape[1]},)")


def _fused(q, k, v, scale, window, sinks):
    """Metal: MLX's fused kernel, per query tile (with a tile-sized mask) when a window cuts the keys."""
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    L, lk = q.shape[2], k.shape[2]
    if window is None or window >= lk:
        mask = "causal" if L > 1 else None  # MLX aligns the causal mask to the bottom-right
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
    outs = []
    for t0 in range(0, L, QUERY_TILE):
        a, t = lk - L + t0, min(QUERY_TILE, L - t0)
        lo, hi = max(0, a - window + 1), a + t
        mask = mx.array(visible(a, t, lo, hi, window))
        outs.append(mx.fast.scaled_dot_product_attention(q[:, :, t0:t0 + t], k[:, :, lo:hi], v[:, :, lo:hi],
                                                         scale=scale, mask=mask, sinks=sinks))
    return mx.concatenate(outs, axis=2)


def _tiled(q, k, v, scale, mass_out, window, sinks):
    _, hq, L, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    rep = hq // hkv
    k, v = k[0].astype(mx.float32), v[0].astype(mx.float32)  # [H_kv, kv_len, D]
    qs = (q[0] * scale).reshape(hkv, rep, L, d)  # query heads grouped by their kv head
    if sinks is not None:
        # the sink as key 0 of every span: q's extra column holds its head's logit, the key (0, ..., 0, 1)
        col = mx.broadcast_to(sinks.astype(mx.float32).reshape(hkv, rep, 1, 1), (hkv, rep, L, 1))
        qs = mx.concatenate([qs, col], axis=-1)
        k = mx.concatenate([k, mx.zeros((hkv, lk, 1), mx.float32)], axis=-1)
        sink_k = mx.concatenate([mx.zeros((hkv, 1, d), mx.float32), mx.ones((hkv, 1, 1), mx.float32)], axis=-1)
        sink_v = mx.zeros((hkv, 1, d), mx.float32)
    x = 0 if sinks is None else 1  # columns before the first key
    outs, mass = [], None
    for t0 in range(0, L, QUERY_TILE):
        a, t = lk - L + t0, min(QUERY_TILE, L - t0)
        lo = 0 if window is None else max(0, a - window + 1)
        hi = a + t
        kt, vt = k[:, lo:hi], v[:, lo:hi]  # [H_kv, span, D(+1)]
        if sinks is not None:
            kt, vt = mx.concatenate([sink_k, kt], axis=1), mx.concatenate([sink_v, vt], axis=1)
        s = qs[:, :, t0:t0 + t].reshape(hkv, rep * t, -1) @ kt.swapaxes(-1, -2)  # [H_kv, rep*t, x + span]
        s = _mask_edges(s.reshape(hkv, rep, t, x + hi - lo), a, t, lo, hi, x, window)
        p = mx.softmax(s.reshape(hkv, rep * t, x + hi - lo), axis=-1)
        outs.append((p @ vt).reshape(hkv, rep, t, d))
        if mass_out is not None:
            m = mx.pad(p[:, :, x:].sum(axis=(0, 1)), (lo, lk - hi))
            mass = m if mass is None else mass + m
    if mass_out is not None:
        mass_out.append(mass)
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
    return out.reshape(1, hq, L, d)


def _mask_edges(s, a, t, lo, hi, x, window):
    """Sets the invisible scores of a tile to -inf, touching only its edge columns (`prefill_cpu.edges`).

    s: [H_kv, rep, t, x + hi - lo] scores of queries [a, a + t) over (x sink columns and) keys [lo, hi).
    """
    for c0, c1 in edges(a, t, lo, hi - lo, window):
        vis = mx.array(visible(a, t, lo + c0, lo + c1, window))
        s[..., x + c0:x + c1] = mx.where(vis, s[..., x + c0:x + c1], -float("inf"))
    return s
