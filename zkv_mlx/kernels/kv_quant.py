"""Quantized KV formats: what a pool stores and the pure-MLX quantize/dequantize of its blocks.

Two layouts, both packed along head_dim like `mx.quantize` (element j of a uint32 word in bits
[j*bits, (j+1)*bits)), affine `x = scale * q + bias` with float16 scales and biases:
- per token ("token"): `mx.quantize` itself, scales/biases [..., BS, D / group].
- per channel ("channel", keys only, KIVI-style): one scale and bias per channel over the BS tokens of a full
  block, scales/biases [..., 1, D]. A block is quantized only once it is full; until then the pool keeps the
  sequence's partial tail block in full precision (storage/kv_pool.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

SCALE_DTYPE = mx.float16
QUANT_NAMES = ("none", "int8", "int4", "k8v4")
# Per-token group along head_dim when --kv-group-size is not given. int8: 32, because groups of 64 measured
# +0.145% perplexity on a held-out text (Apache-2.0 licence, docs/benchmarks.md, issue #19), over the 0.1% aim.
DEFAULT_GROUP = {"int8": 32, "int4": 64, "k8v4": 64}


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """K and V storage of a quantized pool.

    k_bits, v_bits: 8 or 4. group_size: per-token group along head_dim (V, and K in token layout).
    k_channel: keys quantized per channel over a full block (tail block kept in full precision).
    sinks: with per-channel keys, the keys of a sequence's first `sinks` positions are kept in full precision
        (and left out of their block's per-channel ranges).
    """

    k_bits: int
    v_bits: int
    group_size: int
    k_channel: bool
    sinks: int = 0

    @classmethod
    def from_config(cls, kv) -> QuantSpec | None:
        """The spec of a `KVCacheConfig` (None for quant="none")."""
        if kv.quant == "none":
            return None
        kb, vb = {"int8": (8, 8), "int4": (4, 4), "k8v4": (8, 4)}[kv.quant]
        channel = kv.channel_keys
        return cls(kb, vb, kv.group_size or DEFAULT_GROUP[kv.quant], channel, kv.sinks if channel else 0)

    def name(self, block_size: int) -> str:
        k = f"q{self.k_bits}c{block_size}" if self.k_channel else f"q{self.k_bits}g{self.group_size}"
        sinks = f";sinks={self.sinks}" if self.sinks else ""
        return f"k={k};v=q{self.v_bits}g{self.group_size}{sinks}"

    def bytes_per_row(self, n_kv_heads: int, head_dim: int, block_size: int) -> float:
        """Bytes of K and V per token position of one layer, scales and biases included."""
        s = SCALE_DTYPE.size
        k_meta = 2 * s * head_dim / block_size if self.k_channel else 2 * s * head_dim / self.group_size
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


def quantize_channels(x: mx.array, bits: int) -> tuple[mx.array, mx.array, mx.array]:
    """Per-channel quantization over the token axis of full blocks.

    Args:
        x: [..., BS, D] float (the BS tokens of each block).
    Returns:
        packed [..., BS, D * bits / 32] uint32, scales and biases [..., 1, D] float16.
    """
    q, s, b = _affine(x, -2, bits)
    return pack(q, bits), s, b


def dequantize_channels(packed, scales, biases, bits: int, dtype=mx.float32) -> mx.array:
    """Inverse of `quantize_channels`: [..., BS, D] in `dtype` (one fused graph per shape: unpack, scale, bias)."""
    return _DEQ_CHANNELS[bits](packed, scales, biases).astype(dtype)


def _dequantize_channels(bits: int):
    def f(packed, scales, biases):
        return unpack(packed, bits).astype(mx.float32) * scales.astype(mx.float32) + biases.astype(mx.float32)

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
