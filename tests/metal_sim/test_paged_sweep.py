"""metal/paged_attention.metal, run from its exact source in the simulator, against the pure-MLX reference.

Axes: dtype x KV format (float, 8-bit, 4-bit, K and V formats mixed) x head_dim x block size x GQA ratio x
one/two-pass. Every case holds five sequences of lengths 1, block-1, block, block+1 and long in one call,
on shuffled (non-contiguous) block ids. dtype x format x pass is a full product; the rest is pairwise.
Keys per channel (`ChannelKeyPool`, written through a real `KVPool` in chunks so that tail slabs, completed
blocks and sinks all occur) add lengths 3 (inside the sinks) and use the same axes. The attention-mass
kernels (`return_mass=True`) are checked on their own cases: every format x pass, then block size x GQA x
dtype x pass pairwise. Kernels are compiled up front, in parallel, once per variant.
"""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from zkv_mlx.kernels import metal, registry
from zkv_mlx.kernels.kv_format import ChannelKeyPool, QuantizedPool, quantize_pool
from zkv_mlx.kernels.kv_quant import QuantSpec
from zkv_mlx.kernels.reference_quant import paged_attention_reference_quantized
from zkv_mlx.storage.kv_pool import KVPool

from . import compile_many, fake_metal_kernel, sim_options

DTYPES = {"f16": mx.float16, "bf16": mx.bfloat16, "f32": mx.float32}
# (K format, V format); None = float storage in the case's dtype, (bits, group) = mx.quantize
FORMATS = {
    "float": (None, None), "q8": ((8, 64), (8, 64)), "q4": ((4, 32), (4, 32)),
    "q4k_q8v": ((4, 64), (8, 32)), "floatk_q4v": (None, (4, 64)), "q8k_floatv": ((8, 32), None),
}
# Keys per channel over a block (KVPool with QuantSpec(k_bits, v_bits, V group, k_channel=True, sinks[, key
# metadata])). q4c_e4m3 is the int4 default (issue #19: 8-bit e4m3 scale + zero point per channel and block),
# q4c the int4 before it (int4-f16).
CK_FORMATS = {"q4c": (4, 4, 64, 4), "q8c_q4v": (8, 4, 32, 2), "q4c_q8v_nosinks": (4, 8, 64, 0),
              "q4c_e4m3": (4, 4, 32, 4, "e4m3")}
HEAD_DIMS, BLOCK_SIZES, GQA = (64, 80, 96, 128, 256), (8, 16, 32, 64, 128), (1, 3, 4)
LONG = 517
# The kernel accumulates in float, so it is compared with the reference run in float32 on the same stored
# values (the reference in bf16 rounds scores to bf16: errors of several bf16 ulps). What remains is the
# rounding of the output to the dtype (half an ulp: 2^-11 fp16, 2^-8 bf16) and summation order.
RTOL = {"f32": 1e-5, "f16": 1e-3, "bf16": 8e-3}
ATOL = {"f32": 1e-5, "f16": 1e-4, "bf16": 1e-3}


def _pairwise(axes: dict, allowed) -> list[dict]:
    """Greedy all-pairs: every allowed value pair of every two axes appears in some case."""
    names = list(axes)
    combos = [dict(zip(names, v)) for v in itertools.product(*axes.values())]
    combos = [c for c in combos if allowed(c)]
    pairs = [{(a, c[a], b, c[b]) for a, b in itertools.combinations(names, 2)} for c in combos]
    todo = set().union(*pairs)
    cases = []
    while todo:
        best = max(range(len(combos)), key=lambda i: len(pairs[i] & todo))
        cases.append(combos[best])
        todo -= pairs[best]
    return cases


def _allowed(c):
    # mx.quantize groups must divide head_dim (so head_dim 80 is float only, and has no per-channel cases:
    # their values are quantized)
    if c["fmt"] in CK_FORMATS:
        return c["head_dim"] % CK_FORMATS[c["fmt"]][2] == 0
    return all(f is None or c["head_dim"] % f[1] == 0 for f in FORMATS[c["fmt"]])


CASES = [dict(dtype=d, fmt=f, head_dim=128, block_size=16, gqa=2, two_pass=p)
         for d, f, p in itertools.product(DTYPES, FORMATS, (False, True))]
CASES += _pairwise({"head_dim": HEAD_DIMS, "block_size": BLOCK_SIZES, "fmt": list(FORMATS), "gqa": GQA,
                    "dtype": list(DTYPES), "two_pass": (False, True)}, _allowed)
CK_CASES = [dict(dtype=d, fmt=f, head_dim=128, block_size=32, gqa=2, two_pass=p)
            for d, f, p in itertools.product(DTYPES, CK_FORMATS, (False, True))]
CK_CASES += _pairwise({"head_dim": (64, 96, 128, 256), "block_size": BLOCK_SIZES, "fmt": list(CK_FORMATS),
                       "gqa": GQA, "dtype": list(DTYPES), "two_pass": (False, True)}, _allowed)
# return_mass=True: every format (token and per-channel) x pass, then the other axes pairwise
MASS_CASES = [dict(dtype=list(DTYPES)[i % 3], fmt=f, head_dim=64, block_size=16, gqa=2, two_pass=p, mass=True)
              for i, (f, p) in enumerate(itertools.product([*FORMATS, *CK_FORMATS], (False, True)))]
MASS_CASES += [dict(c, head_dim=64, mass=True) for c in _pairwise(
    {"block_size": BLOCK_SIZES, "gqa": GQA, "dtype": list(DTYPES), "two_pass": (False, True),
     "fmt": ["float", "q4k_q8v", "q4c", "q4c_e4m3"]}, lambda c: True)]
ALL_CASES = CASES + CK_CASES + MASS_CASES


def _case_id(c):
    passes = "2p" if c["two_pass"] else "1p"
    return (f"{c['dtype']}-{c['fmt']}-d{c['head_dim']}-bs{c['block_size']}-g{c['gqa']}-{passes}"
            + ("-mass" if c.get("mass") else ""))


def _lengths(c):
    bs = c["block_size"]
    if c["fmt"] in CK_FORMATS:  # 3: inside the sinks and the tail block
        return [1, 3, bs - 1, bs, bs + 1, LONG]
    return [1, bs - 1, bs, bs + 1, LONG]


def make_inputs(c, seed=0):
    """q, pools, shuffled block tables and the lengths of one case."""
    if c["fmt"] in CK_FORMATS:
        return make_channel_inputs(c, seed)
    rng = np.random.default_rng(seed)
    dtype, bs, d, n_kv = DTYPES[c["dtype"]], c["block_size"], c["head_dim"], 2
    lens = _lengths(c)
    need = [-(-n // bs) for n in lens]
    nb = sum(need) + 5
    ids = rng.permutation(nb)
    max_blocks = max(need)
    tables = np.zeros((len(lens), max_blocks), np.int32)
    start = 0
    for i, n in enumerate(need):
        tables[i, :n] = ids[start:start + n]
        tables[i, n:] = rng.integers(0, nb, max_blocks - n)  # padding: any valid id
        start += n
    mx.random.seed(seed)
    q = (mx.random.normal((len(lens), n_kv * c["gqa"], 1, d)) * 2).astype(dtype)
    k_fmt, v_fmt = FORMATS[c["fmt"]]
    pools = []
    for fmt in (k_fmt, v_fmt):
        pool = mx.random.normal((nb, n_kv, bs, d)).astype(dtype)
        pools.append(quantize_pool(pool, *fmt) if fmt else pool)
    return q, pools[0], pools[1], mx.array(tables), mx.array(lens, dtype=mx.int32)


def make_channel_inputs(c, seed=0):
    """Like make_inputs for a per-channel key format: the sequences are written into a KVPool in chunks
    (prefill pieces, then one decode row), so full blocks are quantized, blocks completed from the tail slab,
    last blocks left in the slab and the first positions kept as sinks; the block-`bs` sequence is written
    without positions (no sink slot, its first keys read from the quantized block)."""
    rng = np.random.default_rng(seed)
    dtype, bs, d, n_kv = DTYPES[c["dtype"]], c["block_size"], c["head_dim"], 2
    kb, vb, vg, sinks, *meta = CK_FORMATS[c["fmt"]]
    lens = _lengths(c)
    need = [-(-n // bs) for n in lens]
    nb = sum(need) + 5
    ids = rng.permutation(nb)
    max_blocks = max(need)
    pool = KVPool(1, nb, n_kv, bs, d, dtype, QuantSpec(kb, vb, vg, True, sinks, *meta))
    mx.random.seed(seed)
    tables = np.zeros((len(lens), max_blocks), np.int32)
    start = 0
    for i, (n, k) in enumerate(zip(lens, need)):
        table = [int(x) for x in ids[start:start + k]]
        start += k
        tables[i, :k] = table
        tables[i, k:] = rng.integers(0, nb, max_blocks - k)  # padding: any valid id
        keys, values = mx.random.normal((n, n_kv, d)) * 2, mx.random.normal((n, n_kv, d))
        cuts = sorted({0, min(n - 1, 2), n // 3, n - 1, n})
        for a, b in zip(cuts, cuts[1:]):
            pos = list(range(a, b))
            plan = pool.plan_write([table[p // bs] for p in pos], [p % bs for p in pos], None if n == bs else pos)
            pool.write(0, keys[a:b], values[a:b], plan)
    mx.eval(pool.k, pool.v, pool.tail_k, pool.sink_k)
    q = (mx.random.normal((len(lens), n_kv * c["gqa"], 1, d)) * 2).astype(dtype)
    k_pool = pool.k_pool(0)
    assert isinstance(k_pool, ChannelKeyPool) and k_pool.n_sinks == sinks
    return q, k_pool, pool.v_pool(0), mx.array(tables), mx.array(lens, dtype=mx.int32)


def _run(c, monkeypatch):
    q, k, v, tables, lens = make_inputs(c)
    monkeypatch.setattr(metal, "MIN_PARTITION", 64)  # several splits, some past the short sequences' ends
    got = metal.paged_attention_metal(q, k, v, tables, lens, c["head_dim"] ** -0.5, max_len=LONG,
                                      two_pass=c["two_pass"], return_mass=bool(c.get("mass")))
    return q, k, v, tables, lens, got


@pytest.fixture(scope="module")
def simulator():
    mp = pytest.MonkeyPatch()
    mp.setattr(mx.fast, "metal_kernel", fake_metal_kernel)
    registry.clear()
    with sim_options(collect=[]) as opts:  # generate every case's source, then compile them in parallel
        for c in ALL_CASES:
            _run(c, mp)
    compile_many([k for _, k in opts.collect])
    yield
    mp.undo()
    registry.clear()


def test_sweep_covers_every_pair_and_value():
    assert {c["head_dim"] for c in CASES} == set(HEAD_DIMS)
    assert {(c["head_dim"], c["block_size"]) for c in CASES} == set(itertools.product(HEAD_DIMS, BLOCK_SIZES))
    assert {(c["gqa"], c["two_pass"]) for c in CASES} >= set(itertools.product(GQA, (False, True)))
    assert {(c["dtype"], c["fmt"], c["two_pass"]) for c in CASES} == set(itertools.product(DTYPES, FORMATS, (0, 1)))
    assert {(c["dtype"], c["fmt"], c["two_pass"]) for c in CK_CASES} == set(
        itertools.product(DTYPES, CK_FORMATS, (0, 1)))
    assert {(c["head_dim"], c["block_size"]) for c in CK_CASES} == set(
        itertools.product((64, 96, 128, 256), BLOCK_SIZES))
    assert {(c["fmt"], c["two_pass"]) for c in MASS_CASES} == set(
        itertools.product([*FORMATS, *CK_FORMATS], (0, 1)))
    axes = {"block_size": BLOCK_SIZES, "gqa": GQA, "dtype": list(DTYPES), "two_pass": (False, True)}
    for a, b in itertools.combinations(axes, 2):
        assert {(c[a], c[b]) for c in MASS_CASES} >= set(itertools.product(axes[a], axes[b]))


def _reference(case, q, k, v, tables, lens):
    return paged_attention_reference_quantized(q.astype(mx.float32), _f32(k), _f32(v), tables, lens,
                                               case["head_dim"] ** -0.5, LONG, return_mass=bool(case.get("mass")))


@pytest.mark.parametrize("case", CASES + CK_CASES, ids=_case_id)
def test_kernel_matches_reference(case, simulator, monkeypatch):
    q, k, v, tables, lens, out = _run(case, monkeypatch)
    ref = _reference(case, q, k, v, tables, lens)
    got = np.array(out.astype(mx.float32))
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not np.isnan(got).any()
    dt = case["dtype"]
    np.testing.assert_allclose(got, np.array(ref), rtol=RTOL[dt], atol=ATOL[dt])


@pytest.mark.parametrize("case", MASS_CASES, ids=_case_id)
def test_mass_matches_reference(case, simulator, monkeypatch):
    q, k, v, tables, lens, (out, mass) = _run(case, monkeypatch)
    ref_out, ref_mass = _reference(case, q, k, v, tables, lens)
    dt = case["dtype"]
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), np.array(ref_out), rtol=RTOL[dt], atol=ATOL[dt])
    got = np.array(mass)
    assert mass.dtype == mx.float32 and mass.shape == tables.shape
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, np.array(ref_mass), rtol=1e-4, atol=2e-5)
    # each row holds n_heads of probability, all of it in the entries that hold the sequence's positions
    n_heads, bs = q.shape[1], case["block_size"]
    np.testing.assert_allclose(got.sum(axis=1), n_heads, rtol=1e-5)
    used = np.arange(tables.shape[1])[None, :] < -(-np.array(lens)[:, None] // bs)
    assert (got[~used] == 0).all() and (got[used] > 0).all()


def _f32(pool):
    if isinstance(pool, mx.array):
        return pool.astype(mx.float32)
    if isinstance(pool, ChannelKeyPool):  # dequantized in float32 without rounding to the tail dtype
        return pool._replace(tail=pool.tail.astype(mx.float32), sinks=pool.sinks.astype(mx.float32))
    return QuantizedPool(pool.packed, pool.scales.astype(mx.float32), pool.biases.astype(mx.float32))


@pytest.mark.parametrize("order", ["reverse", "random"])
def test_result_does_not_depend_on_thread_order(order, simulator, monkeypatch):
    # A missing barrier or a race on threadgroup memory would show as NaN or a different result.
    for case in CASES[::7] + CK_CASES[::9] + MASS_CASES[::9]:
        *_, forward = _run(case, monkeypatch)
        with sim_options(order=order, seed=11):
            *_, other = _run(case, monkeypatch)
        for a, b in zip(*((x,) if isinstance(x, mx.array) else x for x in (forward, other))):
            np.testing.assert_array_equal(np.array(b.astype(mx.float32)), np.array(a.astype(mx.float32)))
