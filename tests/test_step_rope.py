"""Decode-step RoPE from one shared table (models/step_rope.py): bitwise mx.fast.rope's result."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.rope_utils import Llama3RoPE

from zkv_mlx.models import step_rope
from zkv_mlx.models.step_rope import StepRoPE

LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _ropes():
    return [nn.RoPE(64, traditional=True), nn.RoPE(64, traditional=False, base=500000.0),
            nn.RoPE(32, traditional=False, scale=0.25), Llama3RoPE(64, base=500000.0, scaling_config=LLAMA3)]


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("which", range(4))
def test_decode_rows_rotate_bitwise_as_fast_rope(which, dtype):
    rope = _ropes()[which]
    wrapped = StepRoPE(rope)
    mx.random.seed(3)
    for positions in ([0], [2047], [131071], [5, 4095, 8191]):
        off = mx.array(positions, dtype=mx.int32)
        for heads in (9, 3):  # queries and keys of one step share the table
            x = (3 * mx.random.normal((len(positions), heads, 1, rope.dims))).astype(dtype)
            want, got = rope(x, offset=off), wrapped(x, offset=off)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert mx.array_equal(got, want).item(), (positions, heads)


def test_a_new_offset_array_gets_a_new_table():
    rope = nn.RoPE(64, traditional=True)
    wrapped = StepRoPE(rope)
    x = mx.random.normal((1, 3, 1, 64))
    for p in (10, 11, 10):
        off = mx.array([p], dtype=mx.int32)
        assert mx.array_equal(wrapped(x, offset=off), rope(x, offset=off)).item()


def test_other_calls_go_to_the_wrapped_module():
    rope = nn.RoPE(64, traditional=True)
    wrapped = StepRoPE(rope)
    x = mx.random.normal((1, 3, 5, 64))  # a prefill chunk: an int offset, several positions
    assert mx.array_equal(wrapped(x, offset=7), rope(x, offset=7)).item()
    partial = mx.random.normal((1, 3, 1, 96))  # partial rotary: only `dims` features turn
    off = mx.array([9], dtype=mx.int32)
    assert mx.array_equal(wrapped(partial, offset=off), rope(partial, offset=off)).item()


def test_install_wraps_each_rope_once():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.rope = nn.RoPE(64)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [Attn(), Attn()]

    m = M()
    assert step_rope.install(m) == 2
    assert all(isinstance(a.rope, StepRoPE) for a in m.layers)
    assert step_rope.install(m) == 0  # a second attach leaves them wrapped once


def test_attach_wraps_rope_and_norm_on_the_cpu_only(monkeypatch):
    """On the GPU mx.fast.rope / rms_norm are single Metal kernels: `paged.attach` must leave them alone."""
    from mlx_lm.models import llama

    from zkv_mlx.models import fused_norm, paged

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=100)
    for gpu in (False, True):
        monkeypatch.setattr(paged, "metal_available", lambda gpu=gpu: gpu)
        m = llama.Model(args)
        paged.attach(m)
        ropes = [layer.self_attn.rope for layer in m.model.layers]
        norms = [layer.input_layernorm for layer in m.model.layers]
        assert all(isinstance(r, StepRoPE) for r in ropes) is (not gpu)
        assert all(isinstance(n, fused_norm.DecodeRMSNorm) for n in norms) is (not gpu)
        assert any(isinstance(r, StepRoPE) for r in ropes) is (not gpu)


def test_wrappers_expose_the_wrapped_modules_attributes():
    """Model code that reads `self.rope.base` or `norm.weight` / `norm.eps` (mlx-lm's muse_spark, kimi_k3) keeps
    working after `paged.attach` wrapped the modules."""
    from zkv_mlx.models.fused_norm import DecodeRMSNorm

    r = StepRoPE(nn.RoPE(64, base=12345.0))
    assert r.base == 12345.0 and r.dims == 64 and r.traditional is False
    n = DecodeRMSNorm(nn.RMSNorm(8, eps=1e-3))
    assert n.eps == 1e-3 and n.weight.shape == (8,)
    with pytest.raises(AttributeError):
        r.no_such_attribute


def test_step_tables_are_per_thread():
    """Two engines decoding on two threads keep their own step's tables (no table of the other's positions)."""
    import threading

    rope = StepRoPE(nn.RoPE(64))
    x = mx.random.normal((1, 2, 1, 64))
    offsets = {0: mx.array([5], dtype=mx.int32), 1: mx.array([900], dtype=mx.int32)}
    mx.eval(x, *offsets.values())  # made on this thread's stream: evaluated here (MLX streams are per thread)
    out, seen = {}, {}
    both = threading.Barrier(2)

    def run(i):
        step_rope._STEP.table(offsets[i], rope, mx.float32)
        both.wait()  # both threads' steps have begun: a shared table would hold only one of them now
        seen[i] = step_rope._STEP.offset is offsets[i]
        out[i] = rope(x, offset=offsets[i])
        mx.eval(out[i])
        out[i] = (out[i], rope.inner(x, offset=offsets[i]))  # the reference, on this thread too
        mx.eval(out[i][1])

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {0: True, 1: True}
    for i in (0, 1):
        assert mx.array_equal(*out[i]).item()
    assert not mx.array_equal(out[0][0], out[1][0]).item()  # the positions differ
