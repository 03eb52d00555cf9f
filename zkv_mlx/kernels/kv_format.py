"""KV pool formats the attention paths accept: float arrays, the `mx.quantize` triple along head_dim, or (keys
only) the per-channel layout with its full-precision tail and sink rows (`ChannelKeyPool`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx


class QuantizedPool(NamedTuple):
    """A K or V pool in the `mx.quantize` layout (affine, per group along head_dim).

    packed: [num_blocks, n_kv_heads, block_size, head_dim * bits / 32] uint32.
    scales, biases: [num_blocks, n_kv_heads, block_size, head_dim / group_size].
    """

    packed: mx.array
    scales: mx.array
    biases: mx.array


class ChannelKeyPool(NamedTuple):
    """Keys quantized per channel over the tokens of each full block (KIVI-style, kernels/kv_quant.py), with
    the rows that are not (yet) quantized kept apart in full precision (storage/kv_pool.py).

    packed: [num_blocks, n_kv_heads, block_size, head_dim * bits / 32] uint32 (mx.quantize bit order).
    scales, biases: [num_blocks, n_kv_heads, 1, head_dim]: one per channel and block; key = scale * q + bias.
        float16, or uint8 for 8-bit metadata (an e4m3 scale code and a zero point + 128: kernels/kv_meta.py).
    tail: [tail_slots, n_kv_heads, block_size, head_dim] float: the rows of partial blocks. A sequence's last
        block (the one holding position context_len - 1) is read from here when it has a tail slot.
    sinks: [sink_slots, n_kv_heads, n_sinks, head_dim] float: the keys of positions < n_sinks of sequences whose
        first block has a sink slot (with that shape and a single slot, e.g. zeros, while no block has one; any
        1-element array when n_sinks is 0).
    slots: [num_blocks, 2] int32: per block id its tail slot and sink slot, -1 for none.
    n_sinks: sink positions per sequence (0: none).
    """

    packed: mx.array
    scales: mx.array
    biases: mx.array
    tail: mx.array
    sinks: mx.array
    slots: mx.array
    n_sinks: int


@dataclass(frozen=True, slots=True)
class KVFormat:
    """bits = 0 for float storage (dtype = storage dtype); else bits/group_size (dtype = scale dtype).

    channel: keys per channel over a block (`ChannelKeyPool`; group_size 0), with `sinks` sink positions and
    tail/sink rows stored in `tail_dtype`; dtype uint8 = 8-bit e4m3 metadata.
    """

    bits: int
    group_size: int
    dtype: mx.Dtype
    channel: bool = False
    sinks: int = 0
    tail_dtype: mx.Dtype | None = None

    @property
    def name(self) -> str:
        if self.bits == 0:
            return _dtype_name(self.dtype)
        if self.channel:
            meta = "e4m3" if self.dtype == mx.uint8 else ""
            return f"q{self.bits}c{meta}s{self.sinks}{_dtype_name(self.tail_dtype)}"
        return f"q{self.bits}g{self.group_size}"


def _dtype_name(dtype: mx.Dtype) -> str:
    return {mx.float16: "f16", mx.bfloat16: "bf16", mx.float32: "f32"}.get(dtype, str(dtype))


def is_quantized(pool) -> bool:
    return not isinstance(pool, mx.array)


def pool_format(pool, head_dim: int) -> KVFormat:
    """Format of a pool given the query head_dim; raises ValueError naming the shapes if inconsistent."""
    if not is_quantized(pool):
        return KVFormat(0, 0, pool.dtype)
    if isinstance(pool, ChannelKeyPool):
        packed, scales, biases, tail = pool.packed, pool.scales, pool.biases, pool.tail
        nb, h, bs, words = packed.shape
        bits = words * 32 // head_dim
        if (bits * head_dim != words * 32 or scales.shape != (nb, h, 1, head_dim) or biases.shape != scales.shape
                or tail.shape[1:] != (h, bs, head_dim) or pool.slots.shape != (nb, 2)
                or biases.dtype != scales.dtype):
            raise ValueError(f"per-channel key pool packed {packed.shape} / scales {scales.shape} / biases "
                             f"{biases.shape} / tail {tail.shape} / slots {pool.slots.shape} does not match "
                             f"head_dim {head_dim}")
        return KVFormat(bits, 0, scales.dtype, True, pool.n_sinks, tail.dtype)
    packed, scales, biases = pool
    words, groups = packed.shape[-1], scales.shape[-1]
    bits = words * 32 // head_dim
    if bits * head_dim != words * 32 or groups == 0 or head_dim % groups or biases.shape != scales.shape:
        raise ValueError(f"quantized pool packed {packed.shape} / scales {scales.shape} / biases {biases.shape} "
                         f"does not match head_dim {head_dim}")
    return KVFormat(bits, head_dim // groups, scales.dtype)


def pool_shape(pool) -> tuple[int, int, int]:
    """(num_blocks, n_kv_heads, block_size) of a float or quantized pool."""
    a = pool if not is_quantized(pool) else pool[0]
    return a.shape[0], a.shape[1], a.shape[2]


def quantize_pool(pool: mx.array, bits: int, group_size: int) -> QuantizedPool:
    """Quantizes a float pool [NB, H, BS, D] along head_dim (tests, benchmarks)."""
    return QuantizedPool(*mx.quantize(pool, group_size=group_size, bits=bits))
