"""Decode rows' RMSNorm as one compiled graph (models/fused_norm.py): bitwise mx.fast.rms_norm's result, and only
inside the engine's forward."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from zkv_mlx.models import fused_norm
from zkv_mlx.models.fused_norm import DecodeRMSNorm


@pytest.mark.parametrize("dims", [64, 576, 2048])
def test_decode_rows_normalize_bitwise_as_fast_rms_norm(dims):
    mx.random.seed(5)
    norm = nn.RMSNorm(dims, eps=1e-5)
    norm.weight = mx.random.normal((dims,))
    wrapped = DecodeRMSNorm(norm)
    for batch in (1, 3, 8):
        for scale in (1e-3, 1.0, 300.0):
            x = scale * mx.random.normal((batch, 1, dims))
            want = norm(x)
            with fused_norm.paged_forward():
                got = wrapped(x)
            assert mx.array_equal(got, want).item(), (batch, scale)


def test_outside_the_engine_forward_the_model_keeps_its_own_norm(monkeypatch):
    calls = []
    norm = nn.RMSNorm(64)
    wrapped = DecodeRMSNorm(norm)
    monkeypatch.setattr(fused_norm, "_rms_norm", lambda *a: calls.append(a) or a[0])
    x = mx.random.normal((1, 1, 64))
    assert mx.array_equal(wrapped(x), norm(x)).item() and not calls  # e.g. a bench's mlx-lm reference
    with fused_norm.paged_forward():
        wrapped(x)
        wrapped(mx.random.normal((1, 5, 64)))  # a prefill chunk: the wrapped module
        wrapped(x.astype(mx.float16))  # not float32: the wrapped module
    assert len(calls) == 1


def test_install_wraps_each_norm_once():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = nn.RMSNorm(8)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [Block(), Block()]
            self.norm = nn.RMSNorm(8)

    m = M()
    assert fused_norm.install(m) == 3
    assert fused_norm.install(m) == 0
