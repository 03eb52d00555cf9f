"""Quantized KV formats: what a pool stores and the pure-MLX quantize/dequantize of its blocks.

Two layouts, both packed along head_dim like `mx.quantize` (element j of a uint32 word in bits
[j*bits, (j+1)*bits)), affine `x = scale * q + bias` with float16 scales and biases (per-channel keys may instead
carry 8-bit metadata, an e4m3 scale and a zero point: kernels/kv_meta.py):
- per token ("token"): `mx.quantize` itself, scales/biases [..., BS, D / group].
- per channel ("channel", keys only, KIVI-style): one scale and bias per channel over the BS tokens of a full
  block, scales/biases [..., 1, D]. A block is quantized only once it is full; until then the pool keeps the
  sequence's partial tail block in full precision (storage/kv_pool.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..kv_presets import KV_PRESETS
from .kv_meta import META_DTYPE, affine_e4m3, meta_to_float

SCALE_DTYPE = mx.float16
QUANT_NAMES = ("none", *KV_PRESETS)
# Per-token group along head_dim when --kv-group-size is not given (kv_presets.py says why).
DEFAULT_GROUP = {name: p.group for name, p in KV_PRESETS.items()}
KEY_META = ("f16", "e4m3")


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """K and V storage of a quantized pool.

    k_bits, v_bits: 8 or 4. group_size: per-token group along head_dim (V, and K in token layout).
    k_channel: keys quantized per channel over a full block (tail block kept in full precision).
    sinks: with per-channel keys, the keys of a sequence's first `sinks` positions are kept in full precision
        (and left out of their block's per-channel ranges).
    k_meta: metadata of per-channel keys: "f16" (float16 scale and bias) or "e4m3" (kernels/kv_meta.py).
    """

    k_bits: int
    v_bits: int
    group_size: int
    k_channel: bool
    sinks: int = 0
    k_meta: str = "f16"

    def __post_init__(self):
        if self.k_meta not in KEY_META:
            raise ValueError(f"k_meta {self.k_meta!r} is not one of {KEY_META}")

    @classmethod
    def from_config(cls, kv) -> QuantSpec | None:
        """The spec of a `KVCacheConfig` (None for quant="none")."""
        if kv.quant == "none":
            return None
        p = KV_PRESETS[kv.quant]
        channel = kv.channel_keys
        return cls(p.k_bits, p.v_bits, kv.group_size or p.group, channel, kv.sinks if channel else 0,
                   p.key_meta if channel else "f16")

    @property
    def k_meta_dtype(self) -> mx.Dtype:
        """dtype of the key scales and biases arrays (per-channel e4m3 metadata: uint8)."""
        return META_DTYPE if self.k_meta == "e4m3" else SCALE_DTYPE

    def name(self, block_size: int) -> str:
        k = f"q{self.k_bits}c{block_size}" if self.k_channel else f"q{self.k_bits}g{self.group_size}"
        k += "e4m3" if self.k_meta == "e4m3" else ""
        sinks = f";sinks={self.sinks}" if self.sinks else ""
        return f"k={k};v=q{self.v_bits}g{self.group_size}{sinks}"

    def bytes_per_row(self, n_kv_heads: int, head_dim: int, block_size: int) -> float:
        """Bytes of K and V per token position of one layer, scales and biases included."""
        s = SCALE_DTYPE.size
        k_meta = (2 * self.k_meta_dtype.size * head_dim / block_size if self.k_channel
                  else 2 * s * head_dim / self.group_size)
        k = head_dim * self.k_bits / 8 + k_meta
        v = head_dim * self.v_bits / 8 + 2 * s * head_dim / self.group_size
        return n_kv_heads * (k + v)


def _affine(x: mx.array, axis: int, bits: int) -> tuple[mx.array, mx.array, mx.array]:
    # integers in [0, 2**bits) and float16 scale/bias over `axis` (kept as size 1); x = scale * q + bias
    levels = (1 << bits) - 1
    x = x.astype(mx.float32)
    lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    # Round scale and bias to their stored dtype first so that dequantization uses exactly the values
    # the integers were computed against.
    scales = mx.maximum((hi - lo) / levels, 1e-6).astype(SCALE_DTYPE)
    biases = lo.astype(SCALE_DTYPE)
    q = mx.clip(mx.round((x - biases.astype(mx.float32)) / scales.astype(mx.float32)), 0, levels)
    return q.astype(mx.uint32), scales, biases


def quantize_tokens(x: mx.array, bits: int, group_size: int) -> tuple[mx.array, mx.array, mx.array]:
    """Per-token affine quantization along the last axis in groups (mx.quantize's layout, float16 scales).

    Args:
        x: [..., D] float.
    Returns:
        packed [..., D * bits / 32] uint32, scales and biases [..., D / group_size] float16.
    """
    q, s, b = _affine(x.reshape(*x.shape[:-1], -1, group_size), -1, bits)  # [..., D/g, g]
    return pack(q.reshape(x.shape), bits), s[..., 0], b[..., 0]


def dequantize_tokens(packed, scales, biases, bits: int, group_size: int, dtype=mx.float32) -> mx.array:
    """Inverse of `quantize_tokens`: [..., D] in `dtype`."""
    if group_size in (32, 64, 128):
        # float32 scales: mx.dequantize computes in the scales' dtype
        return mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size,
                             bits=bits).astype(dtype)
    q = unpack(packed, bits).astype(mx.float32)
    q = q.reshape(*q.shape[:-1], -1, group_size)
    x = q * scales[..., None].astype(mx.float32) + biases[..., None].astype(mx.float32)
    return x.reshape(*x.shape[:-2], -1).astype(dtype)


def quantize_channels(x: mx.array, bits: int, meta: str = "f16") -> tuple[mx.array, mx.array, mx.array]:
    """Per-channel quantization over the token axis of full blocks.

    Args:
        x: [..., BS, D] float (the BS tokens of each block).
        meta: "f16" or "e4m3" (kernels/kv_meta.py).
    Returns:
        packed [..., BS, D * bits / 32] uint32, scales and biases [..., 1, D]: float16 (f16), or uint8 e4m3
        scale codes and offset zero points (e4m3).
    """
    q, s, b = affine_e4m3(x, -2, bits) if meta == "e4m3" else _affine(x, -2, bits)
    return pack(q, bits), s, b


def dequantize_channels(packed, scales, biases, bits: int, dtype=mx.float32) -> mx.array:
    """Inverse of `quantize_channels` (either metadata, told apart by the scales' dtype): [..., BS, D] in `dtype`
    (one fused graph per shape: unpack, scale, bias)."""
    return _DEQ_CHANNELS[bits](packed, scales, biases).astype(dtype)


def _dequantize_channels(bits: int):
    def f(packed, scales, biases):
        s, b = meta_to_float(scales, biases)
        return unpack(packed, bits).astype(mx.float32) * s + b

    return mx.compile(f)


_DEQ_CHANNELS = {b: _dequantize_channels(b) for b in (2, 4, 8)}


def pack(q: mx.array, bits: int) -> mx.array:
    """[..., D] uint32 values < 2**bits -> [..., D * bits / 32] uint32 words (mx.quantize's bit order)."""
    e = 32 // bits
    shifts = (mx.arange(e, dtype=mx.uint32) * bits)
    # [..., W, E] << shift, then the E disjoint bit fields summed into one word
    return (q.reshape(*q.shape[:-1], -1, e) << shifts).sum(axis=-1).astype(mx.uint32)


def unpack(words: mx.array, bits: int) -> mx.array:
    """[..., W] uint32 -> [..., W * 32 / bits] uint32 values."""
    e = 32 // bits
    shifts = (mx.arange(e, dtype=mx.uint32) * bits)
    q = (words[..., None] >> shifts) & ((1 << bits) - 1)
    return q.reshape(*words.shape[:-1], -1)
