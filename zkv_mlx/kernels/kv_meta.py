"""8-bit metadata of keys quantized per channel: an e4m3 scale rounded up and an integer zero point.

Issue #19's int4 format (chosen by docs/experiments/kv_candidates.py, row "c32 u8 / v g32 f16"); the quantizer
is that script's `_round_meta` and `affine(meta="u8")`, op for op, so the engine reproduces its figures:

    s = the smallest e4m3 value >= max((hi - lo) / levels, 1e-6)  (rounded up: the range [lo, hi] stays covered)
    z = clip(round(-lo / s), -128, 127),  q = clip(round(x / s) + z, 0, levels),  x ~ s * (q - z)

Stored per channel and block: the scale's e4m3 code (uint8: 4 exponent bits with bias 7, 3 mantissa bits,
subnormals below 2**-6, as OCP FP8 E4M3 except that the top code 0x7F means 480, not NaN) and z + 128 (uint8).
Decoded to float scale s and bias b = -s * z, every read path is the float16-metadata one: x = s * q + b.

Limits: scales above 480 (a channel range above 7200 in one block) saturate and clip; a zero point beyond
[-128, 127] (a channel whose values are all far from 0 relative to their spread: |lo| > 128 s) clips z, as in
the measured quantizer.
"""

from __future__ import annotations

import mlx.core as mx

E4M3_MAX = 480.0
META_DTYPE = mx.uint8  # both the scale code and the offset zero point


def round_up_e4m3(x: mx.array) -> mx.array:
    """The smallest e4m3 value >= x (float32, x > 0), saturated at E4M3_MAX (kv_candidates.py `_round_meta`)."""
    e = mx.floor(mx.log2(mx.maximum(x, 2.0 ** -9)))
    step = 2.0 ** (mx.maximum(e, -6) - 3)
    return mx.minimum(mx.ceil(x / step) * step, E4M3_MAX)


def encode_e4m3(s: mx.array) -> mx.array:
    """e4m3 values (float32 on the grid of `round_up_e4m3`) -> uint8 codes, exactly (through the float bits)."""
    bits = s.astype(mx.float32).view(mx.uint32)
    normal = (((bits >> 23) - 120) << 3) | ((bits >> 20) & 7)  # float32 exponent bias 127 -> e4m3 bias 7
    sub = mx.round(s * 512.0).astype(mx.uint32)  # below 2**-6: multiples of 2**-9
    return mx.where(s < 2.0 ** -6, sub, normal).astype(META_DTYPE)


def decode_e4m3(code: mx.array) -> mx.array:
    """uint8 e4m3 codes -> float32 values (the inverse of `encode_e4m3`; metal/paged_blocks.h `zkv_e4m3`)."""
    c = code.astype(mx.uint32)
    e, m = c >> 3, c & 7
    normal = (((e + 120) << 23) | (m << 20)).view(mx.float32)
    return mx.where(e == 0, m.astype(mx.float32) * 2.0 ** -9, normal)


def affine_e4m3(x: mx.array, axis: int, bits: int) -> tuple[mx.array, mx.array, mx.array]:
    """Quantizes x over `axis` (kept, size 1 in the metadata).

    Args:
        x: float array. axis: the axis the scale and zero point are shared over. bits: 4 or 8.
    Returns:
        q uint32 in [0, 2**bits) shaped like x, scale codes and offset zero points (z + 128) uint8.
    """
    levels = (1 << bits) - 1
    x = x.astype(mx.float32)
    lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    s = round_up_e4m3(mx.maximum((hi - lo) / levels, 1e-6))
    z = mx.clip(mx.round(-lo / s), -128, 127)
    q = mx.clip(mx.round(x / s) + z, 0, levels)
    return q.astype(mx.uint32), encode_e4m3(s), (z + 128).astype(META_DTYPE)


def meta_to_float(scales: mx.array, biases: mx.array) -> tuple[mx.array, mx.array]:
    """Float32 (scale, bias) with key = scale * q + bias, from either metadata kind: float16 scale and bias, or
    uint8 e4m3 scale code and offset zero point (b = -s * z, exact in float32: s has 4 significant bits)."""
    if scales.dtype != META_DTYPE:
        return scales.astype(mx.float32), biases.astype(mx.float32)
    s = decode_e4m3(scales)
    return s, -(biases.astype(mx.float32) - 128.0) * s
