"""metal/paged_attention.metal, run from its exact source in the simulator, against the pure-MLX reference.

Axes: dtype x KV format (float, 8-bit, 4-bit, K and V formats mixed) x head_dim x block size x GQA ratio x
one/two-pass. Every case holds five sequences of lengths 1, block-1, block, block+1 and long in one call,
on shuffled (non-contiguous) block ids. dtype x format x pass is a full product; the rest is pairwise.
Kernels are compiled up front, in parallel, once per variant.
"""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from zkv_mlx.kernels import metal, registry
from zkv_mlx.kernels.kv_format import quantize_pool
from zkv_mlx.kernels.reference_quant import paged_attention_reference_quantized

from . import compile_many, fake_metal_kernel, sim_options

DTYPES = {"f16": mx.float16, "bf16": mx.bfloat16, "f32": mx.float32}
# (K format, V format); None = float storage in the case's dtype, (bits, group) = mx.quantize
FORMATS = {
    "float": (None, None), "q8": ((8, 64), (8, 64)), "q4": ((4, 32), (4, 32)),
    "q4k_q8v": ((4, 64), (8, 32)), "floatk_q4v": (None, (4, 64)), "q8k_floatv": ((8, 32), None),
}
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
    # mx.quantize groups must divide head_dim (so head_dim 80 is float only)
    return all(f is None or c["head_dim"] % f[1] == 0 for f in FORMATS[c["fmt"]])


CASES = [dict(dtype=d, fmt=f, head_dim=128, block_size=16, gqa=2, two_pass=p)
         for d, f, p in itertools.product(DTYPES, FORMATS, (False, True))]
CASES += _pairwise({"head_dim": HEAD_DIMS, "block_size": BLOCK_SIZES, "fmt": list(FORMATS), "gqa": GQA,
                    "dtype": list(DTYPES), "two_pass": (False, True)}, _allowed)


def _case_id(c):
    return f"{c['dtype']}-{c['fmt']}-d{c['head_dim']}-bs{c['block_size']}-g{c['gqa']}-{'2p' if c['two_pass'] else '1p'}"


def make_inputs(c, seed=0):
    """q, pools, shuffled block tables and the five lengths of one case."""
    rng = np.random.default_rng(seed)
    dtype, bs, d, n_kv = DTYPES[c["dtype"]], c["block_size"], c["head_dim"], 2
    lens = [1, bs - 1, bs, bs + 1, LONG]
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


def _run(c, monkeypatch):
    q, k, v, tables, lens = make_inputs(c)
    monkeypatch.setattr(metal, "MIN_PARTITION", 64)  # several splits, some past the short sequences' ends
    return q, k, v, tables, lens, metal.paged_attention_metal(q, k, v, tables, lens, c["head_dim"] ** -0.5,
                                                              max_len=LONG, two_pass=c["two_pass"])


@pytest.fixture(scope="module")
def simulator():
    mp = pytest.MonkeyPatch()
    mp.setattr(mx.fast, "metal_kernel", fake_metal_kernel)
    registry.clear()
    with sim_options(collect=[]) as opts:  # generate every case's source, then compile them in parallel
        for c in CASES:
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


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_reference(case, simulator, monkeypatch):
    q, k, v, tables, lens, out = _run(case, monkeypatch)
    ref = paged_attention_reference_quantized(q.astype(mx.float32), _f32(k), _f32(v), tables, lens,
                                              case["head_dim"] ** -0.5, LONG)
    got = np.array(out.astype(mx.float32))
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not np.isnan(got).any()
    dt = case["dtype"]
    np.testing.assert_allclose(got, np.array(ref), rtol=RTOL[dt], atol=ATOL[dt])


def _f32(pool):
    if isinstance(pool, mx.array):
        return pool.astype(mx.float32)
    return type(pool)(pool.packed, pool.scales.astype(mx.float32), pool.biases.astype(mx.float32))


@pytest.mark.parametrize("order", ["reverse", "random"])
def test_result_does_not_depend_on_thread_order(order, simulator, monkeypatch):
    # A missing barrier or a race on threadgroup memory would show as NaN or a different result.
    for case in CASES[::7]:
        *_, forward = _run(case, monkeypatch)
        with sim_options(order=order, seed=11):
            *_, other = _run(case, monkeypatch)
        np.testing.assert_array_equal(np.array(other.astype(mx.float32)), np.array(forward.astype(mx.float32)))
