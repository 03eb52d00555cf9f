"""Pure-MLX reference attention over the paged pool (design.md §3-4).

Every kernel variant is checked against these functions; on Linux (and whenever Metal is unavailable or
disabled) they are the production path.
"""

from __future__ import annotations

import mlx.core as mx

from .window import check_sinks, sink_softmax, unview_mass, window_view

# The engine's decode attention for long sequences (and the exp's constants) live in decode_cpu.py.
from .decode_cpu import _C, _LOG2E, _runs, decode_plan, single_decode_attention  # noqa: E402,F401


def _exp2_parts(x):
    y = mx.maximum(x * _LOG2E, -127.0)
    n = mx.round(y)
    f = y - n
    p = _C[6]
    for c in _C[5::-1]:
        p = p * f + c
    return p, (n.astype(mx.int32) + 127) << 23


_exp2_parts_compiled = mx.compile(_exp2_parts, shapeless=True)


def _exp_inline(x: mx.array) -> mx.array:
    # exp_nonpositive's ops, for use inside an mx.compile'd function (fused with the caller's graph)
    p, bits = _exp2_parts(x)
    return p * mx.view(bits, mx.float32)


def exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for float32 x <= 0 (and -inf -> 0), as a fused polynomial.

    MLX's CPU `exp` is scalar (~30 ns an element here) and dominates attention on the CPU; this runs ~9x faster
    with relative error < 3e-7. The exponent bits are assembled outside the compiled part (shapeless compile
    cannot infer `view`'s shape); inputs are flattened so one compiled kernel serves every shape.
    """
    p, bits = _exp2_parts_compiled(x.reshape(-1))
    return (p * mx.view(bits, mx.float32)).reshape(x.shape)


def softmax(s: mx.array, axis: int = -1) -> mx.array:
    """Softmax in float32 with the fast exp (rows must have at least one finite entry)."""
    s = s.astype(mx.float32)
    e = exp_nonpositive(s - s.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def paged_attention_reference(q: mx.array, k_pool: mx.array, v_pool: mx.array, block_tables: mx.array,
                              context_lens: mx.array, scale: float, max_len: int | None = None,
                              return_mass: bool = False, *, window: int | None = None,
                              sinks: mx.array | None = None):
    """Decode attention: one query token per sequence over its paged K/V.

    Args:
        q: [B, n_heads, 1, head_dim] queries (rope applied).
        k_pool, v_pool: [num_blocks, n_kv_heads, block_size, head_dim].
        block_tables: [B, max_blocks] int32 (rows padded with any valid block id; with a window, entries of
            blocks wholly before it are never read and may hold anything).
        context_lens: [B] int32 number of valid positions per sequence (including the current token).
        scale: softmax scale.
        max_len: max(context_lens) if the caller knows it (saves a device sync).
        return_mass: also return the attention mass per block-table entry (`reference_mass.attention_mass`).
        window: sliding window W (every sequence sees its last W positions, `window.py`), None = all.
        sinks: float32 [n_heads] attention-sink logits (one extra softmax column per query head), or None.
    Returns:
        [B, n_heads, 1, head_dim] in q's dtype; with return_mass, (that, [B, max_blocks] float32).
    """
    B, nb = block_tables.shape
    _, h_kv, bs, d = k_pool.shape
    check_sinks(sinks, q.shape[1])
    tables, first, lo, hi = window_view(block_tables, context_lens, window, bs)
    span = tables.shape[1]
    # [B, span, H, BS, D] -> [B, H, span*BS, D]
    k = k_pool[tables].transpose(0, 2, 1, 3, 4).reshape(B, h_kv, span * bs, d)
    v = v_pool[tables].transpose(0, 2, 1, 3, 4).reshape(B, h_kv, span * bs, d)
    if window is None:
        if max_len is None:
            max_len = int(context_lens.max().item())
        k, v = k[:, :, :max_len], v[:, :, :max_len]
    if B == 1 and window is None:
        mask = None  # the slice already is the whole valid context
    else:
        # [B, 1, 1, L]: True where the position belongs to the sequence (and its window)
        pos = mx.arange(k.shape[2])[None, :]
        mask = ((pos < hi[:, None]) & (pos >= lo[:, None]))[:, None, None, :]
    sk = {} if sinks is None else {"sinks": sinks.astype(q.dtype)}
    out = mx.fast.scaled_dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=scale, mask=mask,
                                               **sk)
    if not return_mass:
        return out
    from .reference_mass import attention_mass

    view = mx.arange(B * span, dtype=mx.int32).reshape(B, span)  # the gathered blocks, in view order
    k_view = k_pool[tables].reshape(B * span, h_kv, bs, d)
    mass = attention_mass(q, k_view, view, hi, scale, lo=lo, sinks=sinks)
    return out, (mass if window is None else unview_mass(mass, first, nb))


# Sequences up to this many positions decode through `grouped_decode_attention` (batched, padded per group of
# equal block count); longer ones through `single_decode_attention` (no K/V copy).
GROUPED_MAX_LEN = 512


def grouped_decode_attention(q: mx.array, k_pool: mx.array, v_pool: mx.array, tables: mx.array,
                             lens: mx.array, scale: float, *, window: int | None = None,
                             sinks: mx.array | None = None) -> mx.array:
    """Decode attention for G sequences that all span the same number of blocks, in one batched graph.

    The K/V of the group are gathered into [G, H_kv, nb * BS, D] (short contexts: a small copy), so a batch of
    sequences costs a handful of ops per layer instead of a handful per sequence. Every shape depends only on
    (G, nb, window), and each sequence's rows are computed independently, so a sequence gets bitwise the same
    result alone (G = 1) as inside a group. With a window only the entries it touches are gathered.

    Args:
        q: [G, n_heads, 1, D]. tables: [G, nb] int32 block ids. lens: [G] int32 valid positions (each in
            ((nb - 1) * BS, nb * BS]).
        window: sliding window W, None = all. sinks: float32 [n_heads] attention-sink logits, or None.
    Returns:
        [G, n_heads, 1, D] in q's dtype.
    """
    g = tables.shape[0]
    _, h_kv, bs, d = k_pool.shape
    n_heads = q.shape[1]
    check_sinks(sinks, n_heads)
    view, _, lo, hi = window_view(tables, lens, window, bs)
    nb = view.shape[1]
    k = k_pool[view].transpose(0, 2, 1, 3, 4).reshape(g, h_kv, nb * bs, d).astype(q.dtype)
    v = v_pool[view].transpose(0, 2, 1, 3, 4).reshape(g, h_kv, nb * bs, d).astype(q.dtype)
    qg = (q.reshape(g, h_kv, n_heads // h_kv, d) * scale)  # query heads grouped by their kv head
    s = qg @ k.swapaxes(-1, -2)  # [G, H_kv, rep, L]
    if sinks is None:
        p = _masked_probs(s, lo, hi)
    else:
        p = _masked_probs_sinks(s, lo, hi, sinks.astype(mx.float32).reshape(1, h_kv, n_heads // h_kv, 1))
    return (p.astype(q.dtype) @ v).reshape(g, n_heads, 1, d)


def _visible_probs(s: mx.array, lo: mx.array, hi: mx.array, sinks: mx.array | None) -> mx.array:
    # s [G, H, R, L]: positions outside [lo[g], hi[g]) masked, softmax over L (with the sink logits)
    s = s.astype(mx.float32)
    pos = mx.arange(s.shape[-1])[None, None, None, :]
    s = mx.where((pos < hi[:, None, None, None]) & (pos >= lo[:, None, None, None]), s, -float("inf"))
    return sink_softmax(s, sinks, _exp_inline)


@mx.compile
def _masked_probs(s: mx.array, lo: mx.array, hi: mx.array) -> mx.array:
    """Softmax over the last axis of [G, H, R, L] scores, positions outside [lo[g], hi[g]) masked (fast exp)."""
    return _visible_probs(s, lo, hi, None)


@mx.compile
def _masked_probs_sinks(s: mx.array, lo: mx.array, hi: mx.array, sinks: mx.array) -> mx.array:
    """`_masked_probs` with sink logits [1, H, R, 1] in the denominator."""
    return _visible_probs(s, lo, hi, sinks)


# Prefill attention lives in prefill.py (tiles, windows, sinks); the old name stays for its callers.
from .prefill import prefill_attention as prefill_attention_reference  # noqa: E402,F401
