"""RoPE for decode steps from one cos/sin table per step, shared by every layer (issue #20, w/decode9).

On MLX's CPU backend `mx.fast.rope` costs what its fallback graph costs (mlx/fast.cpp, `rope`:
positions, inverse frequencies, theta, cos, sin, the two strided halves, four products, concatenation), ~20
small ops, so a 30-layer decode step spends ~60 calls x ~20 ops on rotating a handful of rows (measured in
docs/benchmarks.md, "Issue #20 (w/decode9)"). In a decode step every layer rotates the same positions, so the
engine computes the rotation's cos/sin once per step (`_table`, the fallback's own formula and order of float32
operations) and each call is `x * C + swap(x) * S` (one fused elementwise kernel plus the pair swap), with
C = (c, c) and S = (-s, s) laid out as the rotated pairs are. Each output element is the fallback's
`x1 * c - x2 * s` or `x1 * s + x2 * c` computed by the same float operations, so the results are bitwise those
of `mx.fast.rope` (tests/test_step_rope.py); prefill (an int offset, many positions) keeps `mx.fast.rope`.
"""

from __future__ import annotations

import math
import threading

import mlx.core as mx
import mlx.nn as nn


@mx.compile
def _rotate(x: mx.array, swapped: mx.array, c: mx.array, s: mx.array) -> mx.array:
    # one fused elementwise kernel instead of the fallback's products, difference, sum and concatenation
    return x * c + swapped * s


class StepRoPE(nn.Module):
    """Wraps a model's rope module: decode calls (an int32 [B] array offset, one position per row) rotate with
    the step's shared table; every other call goes to the wrapped module unchanged.

    Args:
        rope: `nn.RoPE` or mlx-lm's `Llama3RoPE` (anything with `dims`, `traditional` and either `base`/`scale`
            or `_freqs`, whose call is `mx.fast.rope` with those).
    """

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.inner = rope
        freqs = getattr(rope, "_freqs", None)
        # the table's key: rope modules with equal parameters share one table per step
        self._key = (rope.dims, rope.traditional, getattr(rope, "base", None), getattr(rope, "scale", 1.0),
                     None if freqs is None else id(rope))

    def __getattr__(self, name: str):
        # model code may read the rope's own attributes (e.g. `self.rope.base`): they are the wrapped module's
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)

    def __call__(self, x: mx.array, offset=0, *args, **kwargs):
        if (args or kwargs or not isinstance(offset, mx.array) or x.ndim != 4 or x.shape[2] != 1
                or x.shape[-1] != self.inner.dims or offset.ndim != 1 or offset.shape[0] != x.shape[0]):
            return self.inner(x, offset, *args, **kwargs)
        c, s = _STEP.table(offset, self, x.dtype)
        d = x.shape[-1]
        if self.inner.traditional:  # rotated pairs are (2i, 2i + 1)
            swapped = x.reshape(*x.shape[:-1], d // 2, 2)[..., ::-1].reshape(x.shape)
        else:  # rotated pairs are (i, i + d / 2)
            swapped = mx.concatenate([x[..., d // 2:], x[..., : d // 2]], axis=-1)
        return _rotate(x, swapped, c, s)

    def _table(self, offset: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """(C, S) [B, 1, 1, dims] in `dtype` for positions `offset` [B] (mlx/fast.cpp `rope` fallback's formula:
        theta = position * scale * inv_freq, inv_freq = exp(-i * log(base) / (dims / 2)) or 1 / freqs)."""
        rope = self.inner
        half = rope.dims // 2
        pos = offset.astype(mx.float32) * mx.array(getattr(rope, "scale", 1.0), dtype=mx.float32)
        freqs = getattr(rope, "_freqs", None)
        if freqs is None:
            inv = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32)
                         * mx.array(math.log(rope.base) / half, dtype=mx.float32))
        else:
            inv = mx.reciprocal(freqs)
        theta = pos[:, None] * inv[None]  # [B, half]
        c, s = mx.cos(theta).astype(dtype), mx.sin(theta).astype(dtype)
        join = (lambda a, b: mx.stack([a, b], axis=-1)) if rope.traditional else (
            lambda a, b: mx.concatenate([a, b], axis=-1))
        return join(c, c).reshape(-1, 1, 1, rope.dims), join(-s, s).reshape(-1, 1, 1, rope.dims)


class _StepTables(threading.local):
    """The current decode step's tables: rebuilt when a call brings a new offset array (the next step's).

    Per thread: two engines decoding on two threads in one process each keep their own step's tables.
    """

    def __init__(self):
        self.offset: mx.array | None = None
        self.tables: dict = {}

    def table(self, offset: mx.array, rope: StepRoPE, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        if offset is not self.offset:  # one offset array per step, shared by every layer's cache (PagedCache)
            self.offset, self.tables = offset, {}
        key = (rope._key, dtype)
        if key not in self.tables:
            self.tables[key] = rope._table(offset, dtype)
        return self.tables[key]


_STEP = _StepTables()


def install(model: nn.Module) -> int:
    """Wraps every `nn.RoPE` / `Llama3RoPE` module of the model in a `StepRoPE`; returns how many.

    Other rope modules (YaRN, SuScaled, ...: extra scaling of x or of the result) are left as they are.
    """
    from mlx_lm.models.rope_utils import Llama3RoPE

    n = 0
    for _, module in model.named_modules():
        if isinstance(module, StepRoPE):  # installed already
            continue
        for name, child in list(module.children().items()):
            if type(child) in (nn.RoPE, Llama3RoPE):
                setattr(module, name, StepRoPE(child))
                n += 1
    return n
