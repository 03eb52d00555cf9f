"""Sliding windows and attention-sink logits for the decode attention references.

Window semantics are mlx-lm's `RotatingKVCache(max_size=W)` in cache-index space: the decode query at cache
index n - 1 of a sequence of n rows sees rows [max(0, n - W), n), i.e. the last W keys including its own.
A sink logit (gpt-oss, `mx.fast.scaled_dot_product_attention(..., sinks=)`) is one extra softmax column per
query head that adds exp(sink) to the denominator and contributes no value.

Blocks wholly before the window are never read: `window_view` turns a block table into the view of the
entries a window can touch, so their (possibly stale, even -1) block ids are not used as pool indices.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import ConfigError


def check_window(window: int | None) -> None:
    """Raises ConfigError unless `window` is None or a positive int."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"window={window!r}: a sliding window is a positive number of positions "
                          "(pass window=None for full attention)")


def check_sinks(sinks: mx.array | None, n_heads: int) -> None:
    """Raises ConfigError unless `sinks` is None or one logit per query head ([n_heads])."""
    if sinks is not None and tuple(sinks.shape) != (n_heads,):
        raise ConfigError(f"sinks of shape {tuple(sinks.shape)}: pass one sink logit per query head, "
                          f"shape ({n_heads},)")


def window_span(n_blocks: int, window: int | None, block_size: int) -> int:
    """Most block-table entries a window of `window` positions can touch (out of `n_blocks`)."""
    if window is None:
        return n_blocks
    # positions [n - W, n) start anywhere inside a block: at most ceil((W - 1) / BS) + 1 blocks
    return max(1, min(n_blocks, (window + block_size - 2) // block_size + 1))


def first_block(length: int, window: int | None, block_size: int) -> int:
    """Index in the block table of the first block the window of a sequence of `length` rows touches."""
    return 0 if window is None else max(0, length - window) // block_size


def window_view(block_tables: mx.array, context_lens: mx.array, window: int | None, block_size: int):
    """The block-table entries a window touches, and the visible positions inside them.

    Args:
        block_tables: [B, max_blocks] int32. context_lens: [B] int32 rows per sequence (this token included).
        window: W, or None for full attention.
    Returns:
        (tables [B, span] int32, first [B] int32, lo [B] int32, hi [B] int32): entry j of `tables` is entry
        first + j of `block_tables` (clipped to the last entry past a sequence's end; those positions are
        masked), and position t of the view (t = j * BS + row) is visible when lo <= t < hi.
    """
    check_window(window)
    lens = context_lens.astype(mx.int32)
    if window is None:
        zero = mx.zeros_like(lens)
        return block_tables, zero, zero, lens
    nb = block_tables.shape[1]
    start = mx.maximum(lens - window, 0)
    first = start // block_size
    idx = mx.minimum(first[:, None] + mx.arange(window_span(nb, window, block_size), dtype=mx.int32)[None], nb - 1)
    tables = mx.take_along_axis(block_tables.astype(mx.int32), idx, axis=1)
    off = first * block_size
    return tables, first, start - off, lens - off


def unview_mass(mass: mx.array, first: mx.array, n_blocks: int) -> mx.array:
    """Mass per view entry [B, span] back to the block table's entries [B, n_blocks] (0 outside the view)."""
    idx = first[:, None] + mx.arange(mass.shape[1], dtype=mx.int32)[None]  # [B, span]
    hit = idx[:, :, None] == mx.arange(n_blocks, dtype=mx.int32)[None, None, :]
    return (mass[:, :, None] * hit).sum(axis=1)


def sink_softmax(s: mx.array, sinks: mx.array | None, exp, axis: int | tuple = -1) -> mx.array:
    """Softmax of float32 scores over `axis` with an optional sink logit per row in the denominator.

    Args:
        s: float32 scores, masked entries -inf. axis: an axis or a tuple of axes (the positions).
        sinks: None, or float32 logits broadcastable to s with `axis` reduced to 1 (a fully masked row then
            gives 0, not NaN). exp: exp for arguments <= 0.
    Returns:
        probabilities shaped like s: exp(s - m) / (sum exp(s - m) + exp(sink - m)), m = max(max s, sink).
    """
    m = s.max(axis=axis, keepdims=True)
    if sinks is None:
        e = exp(s - m)
        return e / e.sum(axis=axis, keepdims=True)
    m = mx.maximum(m, sinks)
    e = exp(s - m)
    return e / (e.sum(axis=axis, keepdims=True) + exp(sinks - m))
