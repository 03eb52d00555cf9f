"""Sliding windows and attention-sink logits in the decode attention references, against
mx.fast.scaled_dot_product_attention on dense K/V (window mask, `sinks=`) as the ground truth.

Blocks wholly before a window must never be read: their block-table entries are -1 here (python lists) or
point at a NaN block (arrays), so a read shows as NaN in the output. Lengths cover a block multiple, +1,
shorter than the window, and the first block partly inside the window.
"""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from zkv_mlx.errors import ConfigError
from zkv_mlx.kernels.kv_format import quantize_pool
from zkv_mlx.kernels.kv_quant import QuantSpec
from zkv_mlx.kernels.reference import (decode_plan, grouped_decode_attention, paged_attention_reference,
                                       single_decode_attention)
from zkv_mlx.kernels.reference_quant import paged_attention_reference_quantized, quantized_decode_attention
from zkv_mlx.storage.kv_pool import KVPool

BS, N_KV = 8, 2
WINDOWS = (None, 5, 2 * BS + 3)  # none, smaller than a block, spanning blocks
LENS = (1, 4, 2 * BS, 2 * BS + 1, 5 * BS, 5 * BS + 1, 7 * BS + 3)
GQA = (1, 2, 3, 8)
TOL = {mx.float32: 2e-5, mx.float16: 3e-3}


def _case(gqa, d, dtype=mx.float32, n_kv=N_KV, seed=0):
    """q [B, H, 1, D], pools with a NaN last block, tables (python lists, -1 for blocks before the window
    is decided later), lens."""
    rng = np.random.default_rng(seed)
    need = [-(-n // BS) for n in LENS]
    nb = sum(need) + 1
    ids = rng.permutation(nb - 1)  # the last block (NaN) is never a real block of a sequence
    tables, start = [], 0
    for n in need:
        tables.append([int(x) for x in ids[start:start + n]])
        start += n
    mx.random.seed(seed)
    q = mx.random.normal((len(LENS), n_kv * gqa, 1, d)).astype(dtype)
    k = mx.random.normal((nb, n_kv, BS, d))
    v = mx.random.normal((nb, n_kv, BS, d))
    nan = mx.full((1, n_kv, BS, d), float("nan"))
    k = mx.concatenate([k[:-1], nan]).astype(dtype)
    v = mx.concatenate([v[:-1], nan]).astype(dtype)
    sinks = mx.random.normal((n_kv * gqa,)) * 2
    return q, k, v, tables, list(LENS), sinks


def _stale(tables, lens, window):
    """Tables with the entries of blocks wholly before the window set to -1."""
    out = []
    for t, n in zip(tables, lens):
        first = 0 if window is None else max(0, n - window) // BS
        out.append([-1] * first + t[first:])
    return out


def _dense(pool, table, n):
    # [1, H, n, D] of one sequence's first n rows
    return pool[mx.array(table)].transpose(1, 0, 2, 3).reshape(1, pool.shape[1], -1, pool.shape[-1])[:, :, :n]


def _truth(q, k, v, table, n, scale, window, sinks):
    """sdpa on the sequence's dense K/V with mlx-lm's window mask and sinks (float32)."""
    kd, vd = _dense(k, table, n).astype(mx.float32), _dense(v, table, n).astype(mx.float32)
    mask = None
    if window is not None:
        mask = (mx.arange(n) >= n - window)[None, None, None, :]
    kw = {} if sinks is None else {"sinks": sinks}
    return mx.fast.scaled_dot_product_attention(q.astype(mx.float32), kd, vd, scale=scale, mask=mask, **kw)


def _pad(tables):
    width = max(len(t) for t in tables)
    return mx.array([t + [0] * (width - len(t)) for t in tables], dtype=mx.int32)


def _check(got, want, dtype):
    got = np.array(got.astype(mx.float32))
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, np.array(want), rtol=TOL[dtype], atol=TOL[dtype])


CASES = list(itertools.product(WINDOWS, (False, True), GQA, (64, 80)))


@pytest.mark.parametrize("window,use_sinks,gqa,d", CASES)
def test_paged_and_single_match_sdpa(window, use_sinks, gqa, d):
    q, k, v, tables, lens, sinks = _case(gqa, d, seed=gqa + d)
    sinks = sinks if use_sinks else None
    scale = d ** -0.5
    # the padded array form: stale entries point at the NaN block (index -1 = the last block)
    stale = _stale(tables, lens, window)
    out = paged_attention_reference(q, k, v, _pad(stale), mx.array(lens), scale, max(lens), window=window,
                                    sinks=sinks)
    for i, (t, n) in enumerate(zip(tables, lens)):
        want = _truth(q[i:i + 1], k, v, t, n, scale, window, sinks)
        _check(out[i:i + 1], want, mx.float32)
        single = single_decode_attention(q[i:i + 1], k, v, stale[i], n, scale, window=window, sinks=sinks)
        _check(single, want, mx.float32)
        planned = single_decode_attention(q[i:i + 1], k, v, stale[i], n, scale,
                                          plan=decode_plan(stale[i], n, BS, window), window=window, sinks=sinks)
        assert mx.array_equal(planned, single).item()


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("window,use_sinks", list(itertools.product(WINDOWS, (False, True))))
def test_grouped_is_batch_invariant_and_matches_sdpa(window, use_sinks, dtype):
    gqa, d = 3, 64
    q, k, v, tables, lens, sinks = _case(gqa, d, dtype, seed=7)
    sinks = sinks if use_sinks else None
    # one more sequence on the 6 blocks of the 5*BS+1 one, longer, so that group has two members
    j6 = lens.index(5 * BS + 1)
    tables, lens, q = tables + [tables[j6]], lens + [5 * BS + 4], mx.concatenate([q, q[:1]])
    stale = _stale(tables, lens, window)
    by_nb = {}
    for i, n in enumerate(lens):
        by_nb.setdefault(-(-n // BS), []).append(i)
    assert len(by_nb[6]) == 2
    for nb, members in by_nb.items():
        tab = mx.array([stale[i][:nb] for i in members], dtype=mx.int32)
        ln = mx.array([lens[i] for i in members], dtype=mx.int32)
        group = grouped_decode_attention(q[mx.array(members)], k, v, tab, ln, 0.125, window=window, sinks=sinks)
        for j, i in enumerate(members):
            alone = grouped_decode_attention(q[i:i + 1], k, v, tab[j:j + 1], ln[j:j + 1], 0.125, window=window,
                                             sinks=sinks)
            assert mx.array_equal(alone, group[j:j + 1]).item()
            _check(alone, _truth(q[i:i + 1], k, v, tables[i], lens[i], 0.125, window, sinks), dtype)


@pytest.mark.parametrize("window,use_sinks", list(itertools.product(WINDOWS, (False, True))))
@pytest.mark.parametrize("kbits,vbits", [(8, 8), (4, 8)])
def test_quantized_paths_match_sdpa_on_dequantized(window, use_sinks, kbits, vbits):
    gqa, d, g = 2, 64, 32
    q, k, v, tables, lens, sinks = _case(gqa, d, seed=3)
    sinks = sinks if use_sinks else None
    k, v = mx.nan_to_num(k), mx.nan_to_num(v)  # quantizing a NaN block would poison its neighbours' scales
    kq, vq = quantize_pool(k, kbits, g), quantize_pool(v, vbits, g)
    kd = mx.dequantize(*kq, group_size=g, bits=kbits)
    vd = mx.dequantize(*vq, group_size=g, bits=vbits)
    stale = _stale(tables, lens, window)
    out = paged_attention_reference_quantized(q, kq, vq, _pad(stale), mx.array(lens), 0.125, max(lens),
                                              window=window, sinks=sinks)
    for i, (t, n) in enumerate(zip(tables, lens)):
        want = _truth(q[i:i + 1], kd, vd, t, n, 0.125, window, sinks)
        _check(out[i:i + 1], want, mx.float32)
        got = quantized_decode_attention(q[i:i + 1], tuple(kq), tuple(vq), stale[i], n, 0.125, k_bits=kbits,
                                         v_bits=vbits, group_size=g, k_channel=False, window=window, sinks=sinks)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window,use_sinks", list(itertools.product(WINDOWS, (False, True))))
def test_channel_keys_with_tail_and_sink_tokens(window, use_sinks):
    """Keys per channel (int4 default layout: tail slab, 4 sink tokens) through a real KVPool."""
    gqa, d = 2, 64
    q, _, _, tables, lens, sinks = _case(gqa, d, seed=5)
    sinks = sinks if use_sinks else None
    nb = sum(len(t) for t in tables) + 1
    pool = KVPool(1, nb, N_KV, BS, d, mx.float32, QuantSpec(4, 8, 32, True, 4))
    mx.random.seed(1)
    for t, n in zip(tables, lens):
        keys, values = mx.random.normal((n, N_KV, d)), mx.random.normal((n, N_KV, d))
        for a, b in zip([0, n // 2], [n // 2, n]):  # two chunks: blocks completed from the tail slab
            pos = list(range(a, b))
            if pos:
                pool.write(0, keys[a:b], values[a:b], pool.plan_write([t[p // BS] for p in pos],
                                                                      [p % BS for p in pos], pos))
    stale = _stale(tables, lens, window)
    out = paged_attention_reference_quantized(q, pool.k_pool(0), pool.v_pool(0), _pad(stale), mx.array(lens),
                                              0.125, max(lens), window=window, sinks=sinks)
    qs = pool.quant
    for i, (t, n) in enumerate(zip(tables, lens)):
        kd, vd = pool.gather(0, t, n)
        mask = None if window is None else (mx.arange(n) >= n - window)[None, None, None, :]
        kw = {} if sinks is None else {"sinks": sinks}
        want = mx.fast.scaled_dot_product_attention(q[i:i + 1], kd, vd, scale=0.125, mask=mask, **kw)
        # the references dequantize in the (fp16) scale dtype, gather in the pool dtype: fp16 rounding apart
        _check(out[i:i + 1], want, mx.float16)
        ids = t[: -(-n // BS)]
        tail = pool.tail_k[0][pool._slot[ids[-1]]] if ids[-1] in pool._slot else None
        sk = pool.sink_k[0][pool._sink_slot[ids[0]]][:, :min(4, n)] if ids[0] in pool._sink_slot else None
        got = quantized_decode_attention(q[i:i + 1], pool.k[0], pool.v[0], stale[i], n, 0.125, k_bits=4, v_bits=8,
                                         group_size=qs.group_size, k_channel=True, tail=tail, sink_keys=sk,
                                         window=window, sinks=sinks)
        _check(got, want, mx.float16)


@pytest.mark.parametrize("window,use_sinks", list(itertools.product(WINDOWS, (False, True))))
def test_mass_only_over_visible_blocks(window, use_sinks):
    gqa, d = 2, 64
    q, k, v, tables, lens, sinks = _case(gqa, d, seed=9)
    sinks = sinks if use_sinks else None
    stale = _stale(tables, lens, window)
    out, mass = paged_attention_reference(q, k, v, _pad(stale), mx.array(lens), 0.125, max(lens), True,
                                          window=window, sinks=sinks)
    plain = paged_attention_reference(q, k, v, _pad(stale), mx.array(lens), 0.125, max(lens), window=window,
                                      sinks=sinks)
    assert mx.array_equal(out, plain).item()
    mass = np.array(mass)
    n_heads = q.shape[1]
    for i, (t, n) in enumerate(zip(tables, lens)):
        # ground truth: softmax probabilities per position from the dense scores
        kd = _dense(k, t, n).astype(mx.float32)
        s = (q[i:i + 1] * 0.125).reshape(N_KV, gqa, d) @ kd[0].swapaxes(-1, -2)  # [H_kv, rep, n]
        vis = np.ones(n, bool) if window is None else np.arange(n) >= n - window
        s = np.where(vis, np.array(s), -np.inf).reshape(n_heads, n)
        cols = [s] if sinks is None else [s, np.array(sinks)[:, None]]
        full = np.concatenate(cols, axis=1)
        p = np.exp(full - full.max(axis=1, keepdims=True))
        p = (p / p.sum(axis=1, keepdims=True))[:, :n].sum(axis=0)
        want = np.zeros(mass.shape[1])
        np.add.at(want, np.arange(n) // BS, p)
        np.testing.assert_allclose(mass[i], want, rtol=1e-4, atol=1e-6)
        first = 0 if window is None else max(0, n - window) // BS
        assert (mass[i, :first] == 0).all()
        single_mass = []
        single_decode_attention(q[i:i + 1], k, v, stale[i], n, 0.125, single_mass, window=window, sinks=sinks)
        np.testing.assert_allclose(np.array(single_mass[0]), want[:-(-n // BS)], rtol=1e-4, atol=1e-6)


def test_bad_window_and_sinks_name_the_value():
    q, k, v, tables, lens, sinks = _case(2, 64)
    with pytest.raises(ConfigError, match="window=0"):
        single_decode_attention(q[:1], k, v, tables[0], lens[0], 0.125, window=0)
    with pytest.raises(ConfigError, match=r"shape \(3,\).*\(4,\)"):
        paged_attention_reference(q, k, v, _pad(tables), mx.array(lens), 0.125, window=4, sinks=sinks[:3])


def test_mqa_and_large_gqa():
    """One KV head (MQA) with 8 query heads, window and sinks: all paths agree with sdpa."""
    q, k, v, tables, lens, sinks = _case(8, 64, n_kv=1, seed=2)
    stale = _stale(tables, lens, 11)
    out = paged_attention_reference(q, k, v, _pad(stale), mx.array(lens), 0.125, window=11, sinks=sinks)
    for i, (t, n) in enumerate(zip(tables, lens)):
        want = _truth(q[i:i + 1], k, v, t, n, 0.125, 11, sinks)
        _check(out[i:i + 1], want, mx.float32)
        _check(single_decode_attention(q[i:i + 1], k, v, stale[i], n, 0.125, window=11, sinks=sinks), want,
               mx.float32)
