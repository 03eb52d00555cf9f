"""The simulator is strict where Metal is: non-MSL names don't compile, a missing barrier shows under another
thread order, out-of-bounds accesses are reported, unwritten outputs are NaN."""

import mlx.core as mx
import numpy as np
import pytest

from . import SimCompileError, SimError, SimFault, fake_metal_kernel, sim_options


def run(source, inputs, n=64, grid=None, tg=None, out_dtype=mx.float32, header="", template=None, names=None):
    names = names or [f"in{i}" for i in range(len(inputs))]
    kernel = fake_metal_kernel(name="t", input_names=names, output_names=["out"], source=source, header=header)
    return kernel(inputs=inputs, output_shapes=[(n,)], output_dtypes=[out_dtype], grid=grid or (n, 1, 1),
                  threadgroup=tg or (n, 1, 1), template=template)[0]


A = mx.arange(64).astype(mx.float32)


@pytest.mark.parametrize("expr", ["std::exp(in0[i])", "expf(in0[i])", "(printf(\"x\"), 1.0f)", "double(in0[i])",
                                  "float(malloc(4) != 0)"])
def test_non_msl_names_do_not_compile(expr):
    with pytest.raises(SimCompileError):
        run(f"uint i = thread_position_in_grid.x; out[i] = {expr};", [A])


def test_msl_math_compiles():
    out = run("uint i = thread_position_in_grid.x; out[i] = metal::exp(in0[i] * 0.01f) + exp2(1.0f) + max(in0[i], 3.0f);",
              [A])
    np.testing.assert_allclose(np.array(out), np.exp(np.arange(64) * 0.01) + 2 + np.maximum(np.arange(64), 3), rtol=1e-6)


MISSING_BARRIER = """
  threadgroup float buf[64];
  uint i = thread_position_in_threadgroup.x;
  buf[i] = in0[i];
  %s
  out[i] = i > 0 ? buf[i - 1] : 0.0f;
"""


def test_missing_barrier_caught_by_reversed_order():
    expected = np.concatenate([[0], np.arange(63)])
    # In forward order every thread finishes before the next starts: the race is invisible.
    np.testing.assert_array_equal(np.array(run(MISSING_BARRIER % "", [A])), expected)
    with sim_options(order="reverse"):
        assert np.isnan(np.array(run(MISSING_BARRIER % "", [A]))[1:]).all()  # read before written: poison
        fixed = run(MISSING_BARRIER % "threadgroup_barrier(mem_flags::mem_threadgroup);", [A])
    np.testing.assert_array_equal(np.array(fixed), expected)
    with sim_options(order="random", seed=3):
        assert np.isnan(np.array(run(MISSING_BARRIER % "", [A]))).any()


@pytest.mark.parametrize("index,match", [("i + 1", "read of `in0` .* byte offset 256"),
                                         ("int(i) - 1000", "read of `in0` .* before its start")])
def test_out_of_bounds_read_is_reported(index, match):
    with pytest.raises(SimFault, match=match):
        run(f"uint i = thread_position_in_grid.x; out[i] = in0[{index}];", [A])


def test_out_of_bounds_write_is_reported():
    with pytest.raises(SimFault, match="write of `out`"):
        run("uint i = thread_position_in_grid.x; out[i + 1] = 1.0f;", [A])


def test_unwritten_outputs_are_nan_unless_init_value():
    src = "uint i = thread_position_in_grid.x; if (i % 2 == 0) out[i] = 1.0f;"
    out = np.array(run(src, [A]))
    assert (out[::2] == 1).all() and np.isnan(out[1::2]).all()
    kernel = fake_metal_kernel(name="t", input_names=["in0"], output_names=["out"], source=src)
    out = kernel(inputs=[A], output_shapes=[(64,)], output_dtypes=[mx.float32], grid=(64, 1, 1),
                 threadgroup=(64, 1, 1), init_value=7)[0]
    assert np.array(out)[1] == 7


def test_helper_for_device_pointer_rejects_small_constant_input():
    header = "inline float first(const device float* p) { return p[0]; }\n"
    src = "out[thread_position_in_grid.x] = first(in0);"
    assert np.array(run(src, [A], header=header))[0] == 0  # 64 elements: a device pointer
    with pytest.raises(SimCompileError):  # 4 elements: `constant` on a Mac
        run(src, [mx.ones((4,))], header=header)
    templated = "template <typename P> inline float first(P p) { return p[0]; }\n"
    assert np.array(run(src, [mx.ones((4,))], header=templated))[0] == 1


def test_half_and_bfloat_rounding_and_promotion():
    src = """
      uint i = thread_position_in_grid.x;
      if (i > 0) return;
      half h = half(2048.0f);
      out[0] = h + half(1.0f);          // half + half rounds to half: 2048 (tie to even)
      out[1] = h + 1.0f;                // half + float is float: 2049
      out[2] = h + 3;                   // half + int is half: 2052 (2051 rounds to even)
      out[3] = float(bfloat16_t(1.00390625f));   // bfloat: tie to even -> 1.0
      out[4] = float(bfloat16_t(1.01171875f));   // -> 1.015625
      out[5] = float(half(65520.0f));   // overflows to inf
      out[6] = float(half(1.0f) / half(3.0f));
    """
    out = np.array(run(src, [A], n=8))
    h = np.float16
    expected = [h(2048) + h(1), 2049, h(2048) + h(3), 1.0, 1.015625, np.inf, h(1) / h(3)]
    np.testing.assert_array_equal(out[:7], np.array(expected, dtype=np.float32))


def test_bfloat_needs_explicit_conversion():
    with pytest.raises(SimCompileError):
        run("bfloat16_t b = 1.5f; out[0] = b;", [A], n=1)
    with pytest.raises(SimCompileError):
        run("bfloat16_t b = bfloat16_t(1.5f); half h = b; out[0] = h;", [A], n=1)


def test_divergent_and_early_exit_barriers_are_errors():
    with pytest.raises(SimError, match="different threadgroup_barrier"):
        run("if (thread_position_in_grid.x < 8) { threadgroup_barrier(mem_flags::mem_threadgroup); } "
            "else { threadgroup_barrier(mem_flags::mem_threadgroup); } out[thread_position_in_grid.x] = 0;", [A])
    with pytest.raises(SimError, match="returned before it"):
        run("if (thread_position_in_grid.x < 8) return; threadgroup_barrier(mem_flags::mem_threadgroup); "
            "out[thread_position_in_grid.x] = 0;", [A])


def test_threadgroup_limits():
    with pytest.raises(SimError, match="32 KB"):
        run("threadgroup float big[9000]; big[thread_position_in_grid.x] = 1; out[thread_position_in_grid.x] = 0;", [A])
    with pytest.raises(ValueError, match="maximum allowed threads"):
        run("out[thread_position_in_grid.x] = 0;", [A], n=2048)


def test_threadgroup_memory_is_per_threadgroup():
    src = """
      threadgroup float acc[1];
      uint t = thread_position_in_threadgroup.x;
      if (t == 0) acc[0] = 0.0f;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (uint k = 0; k < 16; k++) { if (t == k) acc[0] += in0[thread_position_in_grid.x]; threadgroup_barrier(mem_flags::mem_threadgroup); }
      out[thread_position_in_grid.x] = acc[0];
    """
    out = np.array(run(src, [A], grid=(64, 1, 1), tg=(16, 1, 1)))
    np.testing.assert_array_equal(out, np.repeat(np.arange(64).reshape(4, 16).sum(1), 16))


def test_atomic_outputs():
    src = "uint t = thread_position_in_grid.x; atomic_fetch_add_explicit(&out[t % 4], in0[t], memory_order_relaxed);"
    kernel = fake_metal_kernel(name="atom", input_names=["in0"], output_names=["out"], source=src, atomic_outputs=True)
    out = kernel(inputs=[A], output_shapes=[(4,)], output_dtypes=[mx.float32], grid=(64, 1, 1),
                 threadgroup=(32, 1, 1), init_value=0)[0]
    np.testing.assert_array_equal(np.array(out), np.arange(64).reshape(16, 4).sum(0))
