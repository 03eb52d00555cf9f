"""SIMD-group collectives: 32 lanes, only the active lanes take part (divergence, early exit, partial groups)."""

import mlx.core as mx
import numpy as np
import pytest

from . import fake_metal_kernel

LANES = np.arange(32)


def run(body, n=64, tg=64, out_dtype=mx.float32):
    src = "const uint lane = thread_index_in_simdgroup; const uint t = thread_position_in_grid.x;\n" + body
    kernel = fake_metal_kernel(name="simd", input_names=["a"], output_names=["out"], source=src)
    out = kernel(inputs=[mx.arange(64).astype(mx.float32)], output_shapes=[(n,)], output_dtypes=[out_dtype],
                 grid=(n, 1, 1), threadgroup=(tg, 1, 1))[0]
    return np.array(out)


CASES = {
    "out[t] = simd_sum(float(lane));": np.full(32, LANES.sum()),
    "out[t] = simd_max(float(lane) * (lane % 2 ? -1.0f : 1.0f));": np.full(32, 30),
    "out[t] = simd_min(int(lane) - 3);": np.full(32, -3),
    "out[t] = simd_product(lane < 4 ? 2.0f : 1.0f);": np.full(32, 16),
    "out[t] = simd_prefix_inclusive_sum(1.0f);": LANES + 1,
    "out[t] = simd_prefix_exclusive_sum(float(lane));": np.cumsum(LANES) - LANES,
    "out[t] = simd_shuffle(float(lane), ushort(31 - lane));": 31 - LANES,
    "out[t] = simd_shuffle_xor(float(lane), ushort(1));": LANES ^ 1,
    "out[t] = simd_shuffle_down(float(lane), ushort(4));": np.where(LANES + 4 < 32, LANES + 4, LANES),
    "out[t] = simd_shuffle_up(float(lane), ushort(4));": np.where(LANES >= 4, LANES - 4, LANES),
    "out[t] = simd_broadcast(float(lane) * 2.0f, ushort(5));": np.full(32, 10),
    "out[t] = simd_all(lane < 32) + 2 * simd_any(lane == 7) + 4 * simd_all(lane < 31);": np.full(32, 3),
    "out[t] = float(ulong(simd_ballot(lane % 8 == 0 && lane < 24)));": np.full(32, 1 + 2**8 + 2**16),
    "out[t] = simd_sum(half(1.0f)) + simd_sum(float2(1.0f, 2.0f)).y;": np.full(32, 32 + 64),
}


@pytest.mark.parametrize("body", sorted(CASES))
def test_collectives_uniform(body):
    out = run(body)
    np.testing.assert_array_equal(out, np.tile(CASES[body], 2))


def test_divergent_branches_reduce_separately():
    out = run("float x; if (lane < 12) { x = simd_sum(1.0f); } else { x = 100.0f + simd_sum(1.0f); }\n"
              "out[t] = x + 1000.0f * simd_sum(1.0f);")  # reconverged: all 32 lanes
    np.testing.assert_array_equal(out[:32], np.where(LANES < 12, 12, 120) + 32000)


def test_loop_with_lane_dependent_trip_count():
    # lane l runs l % 4 + 1 iterations: iteration k is summed over the lanes still looping
    out = run("float acc = 0.0f; for (uint k = 0; k <= lane % 4; k++) { acc += simd_sum(1.0f); } out[t] = acc;")
    active = [32, 24, 16, 8]
    np.testing.assert_array_equal(out[:32], [sum(active[:l % 4 + 1]) for l in LANES])


def test_early_exit_and_partial_simdgroup():
    out = run("if (lane >= 20) { out[t] = -1.0f; return; } out[t] = simd_sum(1.0f);")
    np.testing.assert_array_equal(out[:32], np.where(LANES < 20, 20, -1))
    out = run("out[t] = simd_sum(1.0f) + simd_broadcast_first(float(lane));", n=40, tg=64)  # 32 + 8 lanes
    np.testing.assert_array_equal(out, np.concatenate([np.full(32, 32), np.full(8, 8)]))


def test_shuffle_from_inactive_lane_is_poison():
    out = run("if (lane >= 16) { out[t] = 0.0f; return; } out[t] = simd_shuffle(1.0f, ushort(lane + 16));")
    assert np.isnan(out[:16]).all()
