"""Pure-MLX reference decode attention over pools in any KV format (float, `mx.quantize` triples, or keys per
channel with their tail and sink rows)."""

from __future__ import annotations

import mlx.core as mx

from .kv_format import ChannelKeyPool, is_quantized, pool_format, pool_shape
from .kv_meta import meta_to_float
from .kv_quant import dequantize_channels
from .reference import _masked_probs, _masked_probs_sinks, _runs, paged_attention_reference
from .window import check_sinks, first_block, unview_mass, window_view


def _gather_blocks(pool, block_tables: mx.array, head_dim: int) -> mx.array:
    # [B, nb] block ids -> [B * nb, H, BS, D], dequantized where needed
    ids = block_tables.reshape(-1)
    if not is_quantized(pool):
        return pool[ids]
    fmt = pool_format(pool, head_dim)
    packed, scales, biases = pool
    return mx.dequantize(packed[ids], scales[ids], biases[ids], group_size=fmt.group_size, bits=fmt.bits)


def _gather_channel_keys(pool: ChannelKeyPool, block_tables: mx.array, context_lens: mx.array,
                         head_dim: int, first: mx.array | None = None) -> mx.array:
    """The keys of every block-table entry as `KVPool.gather` reads them: [B * nb, H, BS, D] in the tail dtype.

    Quantized blocks are dequantized per channel; a sequence's last block comes from the tail slab when it has a
    tail slot; positions < n_sinks come from the sink slab when the sequence's first block has a sink slot.
    With a window view (`window.window_view`), block_tables/context_lens are the view's entries and `hi`, and
    `first` [B] the index of the view's first entry: sink keys then apply only to views that start at block 0.
    """
    B, nb = block_tables.shape
    bits = pool_format(pool, head_dim).bits
    dtype = pool.tail.dtype
    ids = block_tables.reshape(-1)
    k = dequantize_channels(pool.packed[ids], pool.scales[ids], pool.biases[ids], bits, dtype)
    h, bs = k.shape[1], k.shape[2]
    last = (context_lens.astype(mx.int32) - 1) // bs  # [B]: the block holding the last position
    tail_slot = pool.slots[ids, 0].reshape(B, nb)
    use_tail = (mx.arange(nb)[None, :] == last[:, None]) & (tail_slot >= 0)
    tail = pool.tail[mx.maximum(tail_slot, 0).reshape(-1)]
    k = mx.where(use_tail.reshape(-1)[:, None, None, None], tail, k)
    if pool.n_sinks and pool.sinks.ndim == 4:
        n = min(pool.n_sinks, nb * bs)
        sink_slot = pool.slots[block_tables[:, 0], 1]  # [B]
        if first is not None:
            sink_slot = mx.where(first == 0, sink_slot, -1)
        rows = pool.sinks[mx.maximum(sink_slot, 0)][:, :, :n]  # [B, H, n, D]
        rows = mx.pad(rows, [(0, 0), (0, 0), (0, nb * bs - n), (0, 0)])
        seq = k.reshape(B, nb, h, bs, head_dim).transpose(0, 2, 1, 3, 4).reshape(B, h, nb * bs, head_dim)
        take = (mx.arange(nb * bs)[None, :] < n) & (sink_slot >= 0)[:, None]  # [B, nb*BS]
        seq = mx.where(take[:, None, :, None], rows, seq)
        k = seq.reshape(B, h, nb, bs, head_dim).transpose(0, 2, 1, 3, 4).reshape(B * nb, h, bs, head_dim)
    return k


def paged_attention_reference_quantized(q: mx.array, k_pool, v_pool, block_tables: mx.array,
                                        context_lens: mx.array, scale: float,
                                        max_len: int | None = None, return_mass: bool = False, *,
                                        window: int | None = None, sinks: mx.array | None = None):
    """`paged_attention_reference` for pools that may be quantized (K and V formats may differ).

    Args:
        q: [B, n_heads, 1, head_dim].
        k_pool: an array [num_blocks, n_kv_heads, block_size, head_dim], a `QuantizedPool` or a `ChannelKeyPool`.
        v_pool: an array or a `QuantizedPool`.
        block_tables, context_lens, scale, max_len, window, sinks: as in `paged_attention_reference` (blocks
            wholly before the window are neither read nor dequantized).
        return_mass: also return the attention mass per block-table entry (`reference_mass.attention_mass`).
    Returns:
        [B, n_heads, 1, head_dim] in q's dtype; with return_mass, (that, [B, max_blocks] float32).
    """
    B, nb = block_tables.shape
    d = q.shape[-1]
    view, first, _, hi = window_view(block_tables, context_lens, window, pool_shape(k_pool)[2])
    if isinstance(k_pool, ChannelKeyPool):
        k = _gather_channel_keys(k_pool, view, hi, d, first)
    else:
        k = _gather_blocks(k_pool, view, d)
    v = _gather_blocks(v_pool, view, d)
    span = view.shape[1]
    tables = mx.arange(B * span, dtype=mx.int32).reshape(B, span)  # the gathered blocks, in view order
    # in the view the window keeps the same positions: max(hi - W, 0) is the view's first visible one
    out = paged_attention_reference(q, k, v, tables, hi, scale, max_len if window is None else None,
                                    return_mass, window=window, sinks=sinks)
    if not return_mass or window is None:
        return out
    return out[0], unview_mass(out[1], first, nb)


# -- CPU decode straight from quantized blocks ------------------------------------------------------------------
_QMM_GROUPS = (128, 64, 32)  # group sizes mx.quantized_matmul takes
_MAX_RUNS = 8
_UNIT: dict = {}


def qmm_supported(head_dim: int, group_size: int, k_channel: bool) -> bool:
    """True when `quantized_decode_attention` can read a pool of this geometry."""
    return group_size in _QMM_GROUPS and (not k_channel or any(head_dim % g == 0 for g in _QMM_GROUPS))


def _unit_affine(n: int, h: int, bs: int, groups: int) -> tuple[mx.array, mx.array]:
    # scale 1, bias 0 for n blocks: quantized_matmul then reads the raw integers (per-channel keys)
    key = (h, bs, groups)
    ones, zeros = _UNIT.get(key, (None, None))
    if ones is None or ones.shape[0] < n:
        size = max(n, 2 * (0 if ones is None else ones.shape[0]), 64)
        ones, zeros = mx.ones((size, h, bs, groups), mx.float32), mx.zeros((size, h, bs, groups), mx.float32)
        _UNIT[key] = (ones, zeros)
    return ones[:n], zeros[:n]


def quantized_decode_attention(q: mx.array, k: tuple, v: tuple, ids: list[int], length: int, scale: float, *,
                               k_bits: int, v_bits: int, group_size: int, k_channel: bool,
                               tail: mx.array | None = None, sink_keys: mx.array | None = None,
                               window: int | None = None, sinks: mx.array | None = None) -> mx.array:
    """Decode attention for one sequence computed from its quantized blocks, without dequantizing them (CPU path).

    Scores and outputs come from `mx.quantized_matmul` over slices of the pool (contiguous runs of block ids; a
    gather of the packed words when the table is scattered). Keys per token: q . dequant(K) directly. Keys per
    channel (k = scale_c * i + bias_c over a block): q . k = (q * scale) . i + q . bias, so the matmul reads the
    raw integers with unit scales and the per-block channel scales fold into q (8-bit e4m3 metadata is decoded
    to float scale and bias first: kernels/kv_meta.py). V is per token: p @ dequant(V).

    Args:
        q: [1, n_heads, 1, D] float. k, v: the layer's (packed, scales, biases) pool arrays.
        ids: the sequence's block ids (at least ceil(length / BS); with a window, entries of blocks wholly
            before it are never read). length: valid positions, this token included.
        k_bits, v_bits, group_size, k_channel: the pool's `QuantSpec`.
        tail: [H, BS, D] float keys of the last block when it is partial (per-channel keys: not yet quantized).
        sink_keys: [H, n, D] float keys of positions < n (per-channel keys with sink tokens), replacing the
            stored ones. (A 3-d `sinks` is taken as sink_keys: storage/kv_pool.py still passes them so.)
        window: sliding window W (the last W positions are visible), None = all.
        sinks: float32 [n_heads] attention-sink logits (one extra softmax column per query head), or None.
    Returns:
        [1, n_heads, 1, D] in q's dtype.
    """
    if sinks is not None and sinks.ndim == 3:  # the sink keys under their former name
        sink_keys, sinks = sinks, None
    _, h, bs, _ = k[0].shape
    n_heads, d = q.shape[1], q.shape[-1]
    rep = n_heads // h
    check_sinks(sinks, n_heads)
    first = first_block(length, window, bs)
    end = -(-length // bs)
    nb = end - first  # blocks read
    qh = q.reshape(h, rep, d).astype(mx.float32) * scale  # query heads grouped by their kv head
    nq = nb - 1 if tail is not None else nb  # blocks whose keys are read quantized
    runs = _runs(ids[first:end])
    if len(runs) > _MAX_RUNS:
        idx = mx.array(ids[first:end], dtype=mx.int32)
        parts, vparts = [(idx, nb)], [(idx, nb)]
    else:
        parts = [(slice(a, a + n), n) for a, n in runs]
        vparts = parts
    scores = _key_scores(qh, k, parts, nq, k_bits, group_size, k_channel)
    if tail is not None:
        scores.append((qh @ tail.astype(mx.float32).swapaxes(-1, -2))[None])
    s = scores[0] if len(scores) == 1 else mx.concatenate(scores, axis=0)
    s = s.transpose(1, 2, 0, 3).reshape(h, rep, nb * bs)
    if sink_keys is not None and first == 0:  # sink tokens live in block 0
        s = mx.concatenate([qh @ sink_keys.astype(mx.float32).swapaxes(-1, -2), s[..., sink_keys.shape[1]:]],
                           axis=-1)
    lo = 0 if window is None else max(0, length - window) - first * bs
    bounds = mx.array([lo, length - first * bs], dtype=mx.int32)
    if sinks is None:
        p = _probs(s, bounds)
    else:
        p = _probs_sinks(s, bounds, sinks.astype(mx.float32).reshape(h, rep, 1))
    p = p.reshape(h, rep, nb, bs).transpose(2, 0, 1, 3)  # [nb, H, rep, BS]
    out = _value_sum(p, v, vparts, group_size, v_bits)
    return out.reshape(1, n_heads, 1, d).astype(q.dtype)


def _key_scores(qh: mx.array, k: tuple, parts: list, nq: int, k_bits: int, group_size: int,
                k_channel: bool) -> list:
    # Scores of qh [H, rep, D] against the first nq blocks of `parts`, read quantized: [n, H, rep, BS] per part.
    kp, ks, kb = k
    _, h, bs, _ = kp.shape
    d = qh.shape[-1]
    scores = []
    left = nq
    for sel, n in parts:
        if left <= 0:
            break
        sl = sel if n <= left else (slice(sel.start, sel.start + left) if isinstance(sel, slice) else sel[:left])
        n = min(n, left)
        left -= n
        pk = kp[sl]
        if k_channel:
            g = next(x for x in _QMM_GROUPS if d % x == 0)
            ones, zeros = _unit_affine(n, h, bs, d // g)
            cs, cb = meta_to_float(ks[sl], kb[sl])  # [n, H, 1, D] float32 (float16 or e4m3 metadata)
            s = mx.quantized_matmul(qh[None] * cs, pk, ones, zeros, transpose=True, group_size=g, bits=k_bits)
            s = s + (qh[None] * cb).sum(axis=-1, keepdims=True)
        else:
            s = mx.quantized_matmul(qh[None], pk, ks[sl].astype(mx.float32), kb[sl].astype(mx.float32),
                                    transpose=True, group_size=group_size, bits=k_bits)
        scores.append(s)  # [n, H, rep, BS]
    return scores


def _value_sum(p: mx.array, v: tuple, vparts: list, group_size: int, v_bits: int) -> mx.array:
    # p [nb, H, rep, BS] @ dequant(V) summed over the blocks, read quantized: [H, rep, D].
    vpk, vs, vb = v
    out, start = None, 0
    for sel, n in vparts:
        o = mx.quantized_matmul(p[start:start + n], vpk[sel], vs[sel].astype(mx.float32), vb[sel].astype(mx.float32),
                                transpose=False, group_size=group_size, bits=v_bits).sum(axis=0)
        out = o if out is None else out + o
        start += n
    return out


@mx.compile
def _probs(s: mx.array, bounds: mx.array) -> mx.array:
    """Softmax of [H, rep, L] scores over positions in [bounds[0], bounds[1]) (the fast exp of `_masked_probs`)."""
    return _masked_probs(s[None], bounds[:1], bounds[1:])[0]


@mx.compile
def _probs_sinks(s: mx.array, bounds: mx.array, sinks: mx.array) -> mx.array:
    """`_probs` with sink logits [H, rep, 1] in the denominator."""
    return _masked_probs_sinks(s[None], bounds[:1], bounds[1:], sinks[None])[0]
