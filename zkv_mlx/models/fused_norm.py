"""RMSNorm of decode rows as one compiled graph (issue #20, w/decode9).

On MLX's CPU backend `mx.fast.rms_norm` costs what its fallback graph costs (mlx/fast.cpp, `rms_norm`:
square, mean, add eps, rsqrt, two products, casts), each op dispatched on its own; a decode step runs 2 norms
per layer plus the final one on a single row each. The same operations in the same order under `mx.compile` run
as two kernels (the reduction and one fused elementwise tail) and give bitwise the same rows
(tests/test_fused_norm.py). Only float32 decode rows take this path; other dtypes (whose casts the fallback
places) and prefill chunks (many rows: the per-op cost is shared) keep `mx.fast.rms_norm`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn


@mx.compile
def _rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    # the fallback's order: x * rsqrt(mean(x^2) + eps), then the weight (eps: a constant of the compiled graph)
    return x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps) * weight


class _Scope(threading.local):
    paged = False  # inside a paged forward on this thread (`paged_forward`)


_SCOPE = _Scope()


@contextmanager
def paged_forward():
    """Marks this thread's forward pass as the engine's: only then do wrapped norms take `_rms_norm` (the same
    model object may also run as mlx-lm's own model, e.g. the benches' reference, which must keep its code)."""
    prev, _SCOPE.paged = _SCOPE.paged, True
    try:
        yield
    finally:
        _SCOPE.paged = prev


class DecodeRMSNorm(nn.Module):
    """Wraps an `nn.RMSNorm`: inside `paged_forward`, float32 inputs of one row per sequence ([..., 1, dims])
    take `_rms_norm`; every other call goes to the wrapped module."""

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self.inner = norm

    def __getattr__(self, name: str):
        # model code may read the norm's own attributes (e.g. `norm.weight`, `norm.eps`): the wrapped module's
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)

    def __call__(self, x: mx.array) -> mx.array:
        norm = self.inner
        w = norm["weight"] if "weight" in norm else None
        if (not _SCOPE.paged or w is None or x.dtype != mx.float32 or w.dtype != mx.float32 or x.ndim < 2
                or x.shape[-2] != 1):
            return norm(x)
        return _rms_norm(x, w, float(norm.eps))


def install(model: nn.Module) -> int:
    """Wraps every `nn.RMSNorm` module (exactly that class: model-specific norms keep their own code); returns
    how many."""
    n = 0
    for _, module in model.named_modules():
        if isinstance(module, DecodeRMSNorm):  # installed already
            continue
        for name, child in list(module.children().items()):
            if type(child) is nn.RMSNorm:
                setattr(module, name, DecodeRMSNorm(child))
                n += 1
    return n
