"""kernels/decode_cpu.py: the long-sequence CPU decode attention (issue #20, w/dattn9).

Window, sink and h2o-mass cases are in test_window_sinks.py, batch invariance in test_equivalence.py; here: the
fast exp's accuracy, the plan's visibility mask, and the block-table shapes the engine produces (one run, a few
runs, scattered blocks that are gathered), each against MLX's own attention over the gathered K/V.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from zkv_mlx.kernels import decode_cpu
from zkv_mlx.kernels.decode_cpu import decode_plan, single_decode_attention
from zkv_mlx.kernels.reference import exp_nonpositive

BS, H_KV, REP, D = 16, 3, 3, 64


def test_fast_exp_relative_error_and_edges():
    # (below ~ -87 the result leaves float32's normal range: 2^-126; a softmax weight that small is 0 anyway)
    x = np.concatenate([-np.logspace(-8, np.log10(87.0), 20001), [0.0]]).astype(np.float32)
    got = np.array(mx.compile(decode_cpu._exp_fast)(mx.array(x)))
    want = np.exp(x.astype(np.float64))
    rel = np.abs(got - want) / want
    # 3e-7 from the polynomial, plus float32's rounding of x * log2(e) (about 6e-8 |x|), as the older
    # reference.exp_nonpositive
    bound = 3e-7 + 7e-8 * np.abs(x)
    assert (rel < bound).all(), f"relative error {rel.max():.2e} at x={x[rel.argmax()]}"
    old = np.array(exp_nonpositive(mx.array(x)))
    assert (np.abs(got - old) <= 2 * np.spacing(np.abs(old))).all()  # the same values within 2 ulp
    deep = np.linspace(-120, -87, 1000).astype(np.float32)
    assert np.abs(np.array(mx.compile(decode_cpu._exp_fast)(mx.array(deep))) - np.exp(deep)).max() < 1e-37
    edge = np.array(mx.compile(decode_cpu._exp_fast)(mx.array([-np.inf, -200.0, 0.0], dtype=mx.float32)))
    assert edge[0] == 0.0 and 0.0 <= edge[1] < 1e-37 and edge[2] == 1.0


def test_plan_marks_exactly_the_visible_positions():
    table = list(range(10, 20))
    runs, visible, first = decode_plan(table, 5 * BS + 3, BS)
    assert (runs, first) == ([(10, 6)], 0)  # 6 blocks read
    vis = np.array(visible).reshape(-1)
    assert vis.shape == (6 * BS,) and vis[:5 * BS + 3].all() and not vis[5 * BS + 3:].any()
    # window of BS + 5 over 5 BS + 3 positions: positions [4 BS - 2, 5 BS + 3) are visible, from block 3 on
    runs, visible, first = decode_plan(table, 5 * BS + 3, BS, window=BS + 5)
    vis = np.array(visible).reshape(-1)
    assert first == 3 and runs == [(13, 3)] and vis.shape == (3 * BS,)
    assert not vis[:BS - 2].any() and vis[BS - 2:2 * BS + 3].all() and not vis[2 * BS + 3:].any()


def _sdpa(q, k_pool, v_pool, table, n, scale):
    ids = mx.array(table[: -(-n // BS)], dtype=mx.int32)
    k = k_pool[ids].transpose(1, 0, 2, 3).reshape(1, H_KV, -1, D)[:, :, :n]
    v = v_pool[ids].transpose(1, 0, 2, 3).reshape(1, H_KV, -1, D)[:, :, :n]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)


@pytest.mark.parametrize("layout", ["one run", "three runs", "scattered"])
@pytest.mark.parametrize("n", [BS * 64, BS * 64 + 7, 1000])
@pytest.mark.parametrize("scale", [0.125, 0.3])  # the scale is a compile-time constant: each value its own graph
def test_matches_sdpa_for_the_engines_table_shapes(layout, n, scale):
    rng = np.random.default_rng(n)
    nb, pool = -(-n // BS), 200
    if layout == "one run":
        table = list(range(30, 30 + nb))
    elif layout == "three runs":
        cut = [nb // 3, 2 * nb // 3]
        table = list(range(5, 5 + cut[0])) + list(range(90, 90 + cut[1] - cut[0])) + list(range(140, 140 + nb - cut[1]))
    else:  # more runs than _MAX_RUNS: gathered
        table = [int(b) for b in rng.permutation(pool)[:nb]]
    plan = decode_plan(table, n, BS)
    assert (len(plan[0]) > decode_cpu._MAX_RUNS) == (layout == "scattered")
    k_pool = mx.array(rng.standard_normal((pool, H_KV, BS, D)).astype(np.float32))
    v_pool = mx.array(rng.standard_normal((pool, H_KV, BS, D)).astype(np.float32))
    q = mx.array(rng.standard_normal((1, H_KV * REP, 1, D)).astype(np.float32))
    got = single_decode_attention(q, k_pool, v_pool, table, n, scale, plan=plan)
    assert got.shape == (1, H_KV * REP, 1, D) and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), np.array(_sdpa(q, k_pool, v_pool, table, n, scale)), atol=2e-5,
                               rtol=2e-5)
    # the plan is only a cache: without it the result is bitwise the same
    assert mx.array_equal(single_decode_attention(q, k_pool, v_pool, table, n, scale), got).item()


def test_float16_pool_within_half_precision():
    rng = np.random.default_rng(1)
    n, table = 777, list(range(3, 3 + 49))
    k_pool = mx.array(rng.standard_normal((60, H_KV, BS, D)).astype(np.float16))
    v_pool = mx.array(rng.standard_normal((60, H_KV, BS, D)).astype(np.float16))
    q = mx.array(rng.standard_normal((1, H_KV * REP, 1, D)).astype(np.float16))
    got = single_decode_attention(q, k_pool, v_pool, table, n, 0.125)
    assert got.dtype == mx.float16
    want = _sdpa(q.astype(mx.float32), k_pool.astype(mx.float32), v_pool.astype(mx.float32), table, n, 0.125)
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want), atol=3e-3, rtol=3e-3)
