"""Paged decode attention through the Metal kernels of metal/paged_attention.metal.

One pass: one threadgroup per (sequence, query head) scans the whole context.
Two passes (split context, "flash decoding"): when there are few (sequence, head) pairs to occupy the GPU
and the context is long, pass 1 gives each of n_splits threadgroups a `partition` of the keys and pass 2
merges their softmax states. See `plan_splits` and docs/kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from . import registry
from .kv_format import KVFormat, is_quantized, pool_format, pool_shape

NSG = 8                    # SIMD-groups per attention threadgroup (256 threads)
REDUCE_THREADS = 64
HEAD_DIMS = (64, 80, 96, 128, 256)
BLOCK_SIZES = (8, 16, 32, 64, 128)
QUANT_BITS = (4, 8)
FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
MIN_PARTITION = 256        # keys; below this a split's fixed cost outweighs the extra parallelism
TARGET_THREADGROUPS = 128  # enough threadgroups to keep an M-series GPU's cores streaming KV


class Unsupported(ValueError):
    """No kernel variant covers these shapes or formats (the caller uses the reference)."""


@dataclass(frozen=True, slots=True)
class Variant:
    """What selects a compiled kernel: dtype, geometry and the K/V formats."""

    dtype: mx.Dtype
    head_dim: int
    block_size: int
    k: KVFormat
    v: KVFormat

    def name(self, two_pass: bool | None = None) -> str:
        kind = {None: "", False: "1pass_", True: "2pass_"}[two_pass]
        t = {mx.float16: "f16", mx.bfloat16: "bf16", mx.float32: "f32"}[self.dtype]
        return f"paged_attention_{kind}{t}_d{self.head_dim}_bs{self.block_size}_k{self.k.name}_v{self.v.name}"

    def template(self) -> list[tuple[str, object]]:
        return [("T", self.dtype), ("D", self.head_dim), ("BS", self.block_size), ("NSG", NSG),
                ("KB", self.k.bits), ("KG", self.k.group_size), ("VB", self.v.bits), ("VG", self.v.group_size)]


def select_variant(q: mx.array, k_pool, v_pool, block_tables: mx.array) -> Variant:
    """The variant for these inputs; raises Unsupported naming the value that has no kernel."""
    B, n_heads, L, D = q.shape
    if L != 1:
        raise Unsupported(f"query length {L}: the paged kernels are for decode (1 token per sequence)")
    if q.dtype not in FLOAT_DTYPES:
        raise Unsupported(f"query dtype {q.dtype}")
    if D not in HEAD_DIMS:
        raise Unsupported(f"head_dim {D}: kernels exist for {HEAD_DIMS}")
    nb_k, h_kv, bs = pool_shape(k_pool)
    if pool_shape(v_pool) != (nb_k, h_kv, bs):
        raise Unsupported(f"K pool {pool_shape(k_pool)} and V pool {pool_shape(v_pool)} differ")
    if bs not in BLOCK_SIZES:
        raise Unsupported(f"block size {bs}: kernels exist for {BLOCK_SIZES}")
    if h_kv == 0 or n_heads % h_kv:
        raise Unsupported(f"{n_heads} query heads is not a multiple of {h_kv} KV heads")
    if block_tables.ndim != 2 or block_tables.shape[0] != B:
        raise Unsupported(f"block_tables shape {block_tables.shape} for batch {B}")
    fmts = []
    for which, pool in (("K", k_pool), ("V", v_pool)):
        try:
            fmt = pool_format(pool, D)
        except ValueError as e:
            raise Unsupported(str(e)) from None
        if fmt.dtype not in FLOAT_DTYPES:
            raise Unsupported(f"{which} pool dtype {fmt.dtype}")
        if fmt.bits and (fmt.bits not in QUANT_BITS or fmt.group_size % (32 // fmt.bits)):
            raise Unsupported(f"{which} pool {fmt.bits}-bit, group {fmt.group_size}: kernels exist for {QUANT_BITS} bits")
        fmts.append(fmt)
    return Variant(q.dtype, D, bs, fmts[0], fmts[1])


def plan_splits(batch_heads: int, max_len: int, block_size: int) -> tuple[int, int]:
    """(n_splits, partition): how many threadgroups share one (sequence, head)'s keys, and keys per split.

    Splitting pays when batch * heads threadgroups cannot fill the GPU and the context is long: take up to
    TARGET_THREADGROUPS / (batch * heads) splits of at least MIN_PARTITION keys (a multiple of the block
    size). n_splits == 1 means one pass.
    """
    n = max(1, min(max_len // MIN_PARTITION, _cdiv(TARGET_THREADGROUPS, max(1, batch_heads))))
    if n == 1:
        return 1, max_len
    return _split(max_len, n, block_size)


def choose_passes(batch_heads: int, max_len: int, block_size: int,
                  two_pass: bool | None = None) -> tuple[bool, int, int]:
    """(two_pass, n_splits, partition) from `plan_splits`, or forced by `two_pass` (True/False)."""
    n_splits, partition = plan_splits(batch_heads, max(1, max_len), block_size)
    if two_pass is None:
        return n_splits > 1, n_splits, partition
    if two_pass and n_splits == 1:
        n_splits, partition = _split(max(1, max_len), 2, block_size)
    return two_pass, n_splits, partition


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split(max_len: int, n: int, block_size: int) -> tuple[int, int]:
    partition = _cdiv(_cdiv(max_len, n), block_size) * block_size
    return _cdiv(max_len, partition), partition


def _operands(pool) -> list[mx.array]:
    if is_quantized(pool):
        return list(pool)
    return [pool, _DUMMY, _DUMMY]  # the kernel never reads scales/biases of a float pool


_DUMMY = mx.zeros((1,), dtype=mx.float16)


def paged_attention_metal(q: mx.array, k_pool, v_pool, block_tables: mx.array, context_lens: mx.array,
                          scale: float, max_len: int | None = None, two_pass: bool | None = None) -> mx.array:
    """Decode attention with the Metal kernels; same contract as `paged_attention_reference_quantized`.

    Args:
        two_pass: force the split-context kernels (True) or the one-pass kernel (False); None = heuristic.
    Raises:
        Unsupported: no variant covers the inputs.
    """
    var = select_variant(q, k_pool, v_pool, block_tables)
    B, n_heads, _, D = q.shape
    if two_pass is not False and max_len is None:
        max_len = int(context_lens.max().item())  # a device sync; callers usually know it
    two_pass, n_splits, partition = choose_passes(B * n_heads, max_len or 1, var.block_size, two_pass)
    inputs = [q, *_operands(k_pool), *_operands(v_pool), block_tables.astype(mx.int32),
              context_lens.astype(mx.int32), float(scale)]
    threads = NSG * 32
    if not two_pass:
        kernel = registry.get_kernel("paged_attention_1pass")
        return kernel(inputs=inputs, template=var.template(), grid=(threads * B * n_heads, 1, 1),
                      threadgroup=(threads, 1, 1), output_shapes=[q.shape], output_dtypes=[q.dtype])[0]
    partial = registry.get_kernel("paged_attention_2pass_partial")
    o_part, ml = partial(inputs=inputs + [partition], template=var.template(),
                         grid=(threads * B * n_heads, n_splits, 1), threadgroup=(threads, 1, 1),
                         output_shapes=[(B * n_heads, n_splits, D), (B * n_heads, n_splits, 2)],
                         output_dtypes=[mx.float32, mx.float32])
    reduce = registry.get_kernel("paged_attention_2pass_reduce")
    return reduce(inputs=[o_part, ml], template=[("T", q.dtype), ("D", D)],
                  grid=(REDUCE_THREADS * B * n_heads, 1, 1), threadgroup=(REDUCE_THREADS, 1, 1),
                  output_shapes=[q.shape], output_dtypes=[q.dtype])[0]
