"""KV pool formats the attention paths accept: float arrays, or the `mx.quantize` triple along head_dim."""

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


@dataclass(frozen=True, slots=True)
class KVFormat:
    """bits = 0 for float storage (dtype = storage dtype); else bits/group_size (dtype = scale dtype)."""

    bits: int
    group_size: int
    dtype: mx.Dtype

    @property
    def name(self) -> str:
        if self.bits == 0:
            return {mx.float16: "f16", mx.bfloat16: "bf16", mx.float32: "f32"}.get(self.dtype, str(self.dtype))
        return f"q{self.bits}g{self.group_size}"


def is_quantized(pool) -> bool:
    return not isinstance(pool, mx.array)


def pool_format(pool, head_dim: int) -> KVFormat:
    """Format of a pool given the query head_dim; raises ValueError naming the shapes if inconsistent."""
    if not is_quantized(pool):
        return KVFormat(0, 0, pool.dtype)
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
