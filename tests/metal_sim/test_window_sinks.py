"""Sliding windows and attention-sink logits in metal/paged_attention.metal, run from the exact source in the
simulator, against the pure-MLX reference (and, for float pools, mx.fast.scaled_dot_product_attention on
dense K/V with the window mask and `sinks=`).

Block-table entries of blocks wholly before a sequence's window are set to -1: the simulator faults on any
read through them (`SimFault`), so "never read" is checked, not assumed. Every case holds sequences of
lengths 1, block - 1, block, block + 1 and 517 (whose window leaves dozens of blocks fully out).

Axes: window (None, W < block, W spanning blocks) x sinks (off/on) x GQA (1, 2, 3, 8; 8 as MQA, one KV head)
x head_dim (64, 80, 96, 128, 256) as a full product on float pools; then every K/V format (token and
per-channel keys) x dtype x window x sinks x pass pairwise; then the attention-mass kernels over window x
sinks x format x pass.
"""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from zkv_mlx.errors import ConfigError
from zkv_mlx.kernels import metal, registry
from zkv_mlx.kernels.reference_quant import paged_attention_reference_quantized

from . import compile_many, fake_metal_kernel, sim_options
from .test_paged_sweep import (ATOL, CK_FORMATS, DTYPES, FORMATS, LONG, RTOL, _f32, _pairwise, make_inputs)

BS = 16
WINDOWS = (None, 5, 2 * BS + 3)
HEAD_DIMS = (64, 80, 96, 128, 256)
GQA = (1, 2, 3, 8)

PRODUCT = [dict(window=w, sinks=s, gqa=g, head_dim=d, dtype="f32", fmt="float", two_pass=i % 2 == 1)
           for i, (w, s, g, d) in enumerate(itertools.product(WINDOWS, (False, True), GQA, HEAD_DIMS))]
FORMAT_CASES = [dict(c, gqa=2, head_dim=128) for c in _pairwise(
    {"fmt": [*FORMATS, *CK_FORMATS], "dtype": list(DTYPES), "window": WINDOWS, "sinks": (False, True),
     "two_pass": (False, True)}, lambda c: True)]
MASS_CASES = [dict(window=w, sinks=s, fmt=f, two_pass=p, gqa=2, head_dim=64, dtype="f32", mass=True)
              for w, s, f, p in itertools.product(WINDOWS, (False, True), ("float", "q4k_q8v", "q4c", "q4c_e4m3"),
                                           (False, True))]
ALL = PRODUCT + FORMAT_CASES + MASS_CASES


def _id(c):
    return (f"{c['fmt']}-{c['dtype']}-w{c['window']}-{'sinks' if c['sinks'] else 'nosinks'}-g{c['gqa']}"
            f"-d{c['head_dim']}-{'2p' if c['two_pass'] else '1p'}" + ("-mass" if c.get("mass") else ""))


def _inputs(c):
    """make_inputs of the sweep (one KV head for GQA 8: MQA), with stale entries before each window."""
    case = dict(c, block_size=BS)
    q, k, v, tables, lens = make_inputs(case, seed=c["head_dim"] + c["gqa"])
    if c["gqa"] == 8:  # MQA: keep one KV head, 8 query heads
        q = q[:, :8]
        k, v = (x[:, :1] if isinstance(x, mx.array) else type(x)(*(y[:, :1] for y in x)) for x in (k, v))
    t = np.array(tables)
    if c["window"] is not None:
        for i, n in enumerate(np.array(lens)):
            t[i, :max(0, int(n) - c["window"]) // BS] = -1  # the simulator faults on a read through these
    mx.random.seed(c["head_dim"])
    sinks = mx.random.normal((q.shape[1],)) * 2 if c["sinks"] else None
    return q, k, v, mx.array(t), lens, sinks


def _run(c, monkeypatch):
    q, k, v, tables, lens, sinks = _inputs(c)
    monkeypatch.setattr(metal, "MIN_PARTITION", 16)  # several splits even inside a window
    got = metal.paged_attention_metal(q, k, v, tables, lens, c["head_dim"] ** -0.5, max_len=LONG,
                                      two_pass=c["two_pass"], return_mass=bool(c.get("mass")),
                                      window=c["window"], sinks=sinks)
    return q, k, v, tables, lens, sinks, got


@pytest.fixture(scope="module")
def simulator():
    mp = pytest.MonkeyPatch()
    mp.setattr(mx.fast, "metal_kernel", fake_metal_kernel)
    registry.clear()
    with sim_options(collect=[]) as opts:  # generate every case's source, then compile them in parallel
        for c in ALL:
            _run(c, mp)
    compile_many([k for _, k in opts.collect])
    yield
    mp.undo()
    registry.clear()


def test_product_covers_the_axes():
    assert {(c["window"], c["sinks"], c["gqa"], c["head_dim"]) for c in PRODUCT} == set(
        itertools.product(WINDOWS, (False, True), GQA, HEAD_DIMS))
    assert {(c["window"], c["two_pass"]) for c in PRODUCT} == set(itertools.product(WINDOWS, (False, True)))
    assert {c["fmt"] for c in FORMAT_CASES} == {*FORMATS, *CK_FORMATS}
    assert {(c["fmt"], c["sinks"]) for c in FORMAT_CASES} == set(itertools.product([*FORMATS, *CK_FORMATS],
                                                                                    (False, True)))


def _reference(c, q, k, v, tables, lens, sinks):
    return paged_attention_reference_quantized(q.astype(mx.float32), _f32(k), _f32(v), tables, lens,
                                               c["head_dim"] ** -0.5, LONG, bool(c.get("mass")),
                                               window=c["window"], sinks=sinks)


@pytest.mark.parametrize("case", PRODUCT + FORMAT_CASES, ids=_id)
def test_kernel_matches_reference(case, simulator, monkeypatch):
    q, k, v, tables, lens, sinks, out = _run(case, monkeypatch)
    ref = _reference(case, q, k, v, tables, lens, sinks)
    got = np.array(out.astype(mx.float32))
    assert out.dtype == q.dtype and out.shape == q.shape and not np.isnan(got).any()
    dt = case["dtype"]
    np.testing.assert_allclose(got, np.array(ref), rtol=RTOL[dt], atol=ATOL[dt])
    if case["fmt"] != "float":
        return
    # ground truth: sdpa on each sequence's dense K/V with mlx-lm's window mask and the sinks
    d, scale = case["head_dim"], case["head_dim"] ** -0.5
    for i, n in enumerate(np.array(lens).tolist()):
        row = [b for b in np.array(tables[i]).tolist()[:-(-n // BS)]]
        first = 0 if case["window"] is None else max(0, n - case["window"]) // BS
        ids = mx.array(row[first:])
        kd = k[ids].astype(mx.float32).transpose(1, 0, 2, 3).reshape(1, k.shape[1], -1, d)[:, :, :n - first * BS]
        vd = v[ids].astype(mx.float32).transpose(1, 0, 2, 3).reshape(1, v.shape[1], -1, d)[:, :, :n - first * BS]
        pos = mx.arange(first * BS, n)
        mask = None if case["window"] is None else (pos >= n - case["window"])[None, None, None, :]
        kw = {} if sinks is None else {"sinks": sinks}
        want = mx.fast.scaled_dot_product_attention(q[i:i + 1].astype(mx.float32), kd, vd, scale=scale, mask=mask,
                                                    **kw)
        np.testing.assert_allclose(got[i:i + 1], np.array(want), rtol=RTOL[dt], atol=ATOL[dt])


@pytest.mark.parametrize("case", MASS_CASES, ids=_id)
def test_mass_matches_reference(case, simulator, monkeypatch):
    q, k, v, tables, lens, sinks, (out, mass) = _run(case, monkeypatch)
    ref_out, ref_mass = _reference(case, q, k, v, tables, lens, sinks)
    np.testing.assert_allclose(np.array(out), np.array(ref_out), rtol=RTOL["f32"], atol=ATOL["f32"])
    got = np.array(mass)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, np.array(ref_mass), rtol=1e-4, atol=2e-5)
    # nothing outside the window's blocks; without sinks each row still holds n_heads of probability
    ln = np.array(lens)
    first = np.zeros_like(ln) if case["window"] is None else np.maximum(0, ln - case["window"]) // BS
    j = np.arange(tables.shape[1])[None, :]
    used = (j >= first[:, None]) & (j < -(-ln[:, None] // BS))
    assert (got[~used] == 0).all() and (got[used] > 0).all()
    if sinks is None:
        np.testing.assert_allclose(got.sum(axis=1), q.shape[1], rtol=1e-5)
    else:
        assert (got.sum(axis=1) < q.shape[1]).all()


def test_thread_order_does_not_matter(simulator, monkeypatch):
    for case in ALL[::11]:
        *_, forward = _run(case, monkeypatch)
        with sim_options(order="random", seed=5):
            *_, other = _run(case, monkeypatch)
        for a, b in zip(*((x,) if isinstance(x, mx.array) else x for x in (forward, other))):
            np.testing.assert_array_equal(np.array(b.astype(mx.float32)), np.array(a.astype(mx.float32)))


@pytest.mark.parametrize("return_mass", [False, True])
def test_dispatcher_passes_window_and_sinks(return_mass, monkeypatch):
    """paged_attention(..., window=, sinks=) on ZKV_KERNELS=metal (simulator) equals the reference path."""
    from zkv_mlx.kernels import dispatch, paged_attention

    from .test_dispatch import random_case

    monkeypatch.setattr(mx.fast, "metal_kernel", fake_metal_kernel)
    registry.clear()
    dispatch.reset()
    q, k, v, tables, lens, max_len = random_case(4, dtype=mx.float32, max_ctx=250)
    sinks = mx.array([0.5, -1.0, 2.0, 0.0, 1.5, -0.5])
    kw = dict(window=40, sinks=sinks)
    monkeypatch.setenv("ZKV_KERNELS", "reference")
    want = paged_attention(q, k, v, tables, lens, 0.125, max_len, return_mass, **kw)
    monkeypatch.setenv("ZKV_KERNELS", "metal")
    got = paged_attention(q, k, v, tables, lens, 0.125, max_len, return_mass, **kw)
    for a, b in zip(*((x,) if isinstance(x, mx.array) else x for x in (got, want))):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=2e-5)
    plain = paged_attention(q, k, v, tables, lens, 0.125, max_len)  # the window and sinks did change the result
    assert not np.allclose(np.array(plain), np.array(got if not return_mass else got[0]), atol=1e-3)
    with pytest.raises(ConfigError, match="window=-3"):
        paged_attention(q, k, v, tables, lens, 0.125, max_len, window=-3)
    registry.clear()
    dispatch.reset()
