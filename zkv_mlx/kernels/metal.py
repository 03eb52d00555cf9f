"""Paged decode attention through the Metal kernels of metal/paged_attention.metal.

One pass: one threadgroup per (sequence, query head) scans the whole context.
Two passes (split context, "flash decoding"): when there are few (sequence, head) pairs to occupy the GPU
and the context is long, pass 1 gives each of n_splits threadgroups a `partition` of the keys and pass 2
merges their softmax states. See `plan_splits` and docs/kernels.md.
Keys quantized per channel (`ChannelKeyPool`) have their own kernels (`paged_attention_ck_*`); with
`return_mass` the `*_mass` kernels also write block statistics that `paged_attention_mass` turns into the
attention mass per block-table entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from . import registry
from .kv_format import ChannelKeyPool, KVFormat, is_quantized, pool_format, pool_shape

NSG = 8                    # SIMD-groups per attention threadgroup (256 threads)
REDUCE_THREADS = 64
MASS_THREADS = 64          # threads per threadgroup of paged_attention_mass (one per block-table entry)
HEAD_DIMS = (64, 80, 96, 128, 256)
BLOCK_SIZES = (8, 16, 32, 64, 128)
QUANT_BITS = (4, 8)
FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
# per-channel key metadata the ck kernels read besides float: uint8 e4m3 scale codes and zero points
# (kernels/kv_meta.py; paged_blocks.h picks the decoding by the element type, so the kernel bodies are shared)
CHANNEL_META_DTYPES = (mx.uint8,)
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

    def name(self, two_pass: bool | None = None, mass: bool = False, sinks: bool = False) -> str:
        kind = {None: "", False: "1pass_", True: "2pass_"}[two_pass] + ("mass_" if mass else "")
        kind += "sinks_" if sinks else ""
        t = {mx.float16: "f16", mx.bfloat16: "bf16", mx.float32: "f32"}[self.dtype]
        return f"paged_attention_{kind}{t}_d{self.head_dim}_bs{self.block_size}_k{self.k.name}_v{self.v.name}"

    def template(self, sinks: bool = False) -> list[tuple[str, object]]:
        """Template arguments; `sinks`: attention-sink logits in the softmax (SL)."""
        if self.k.channel:
            return [("T", self.dtype), ("D", self.head_dim), ("BS", self.block_size), ("NSG", NSG),
                    ("KB", self.k.bits), ("SINKS", self.k.sinks), ("VB", self.v.bits), ("VG", self.v.group_size),
                    ("SL", int(sinks))]
        return [("T", self.dtype), ("D", self.head_dim), ("BS", self.block_size), ("NSG", NSG),
                ("KB", self.k.bits), ("KG", self.k.group_size), ("VB", self.v.bits), ("VG", self.v.group_size),
                ("SL", int(sinks))]

    def kernel(self, stage: str, mass: bool) -> str:
        """Registry name of the kernel for `stage` ("1pass" or "2pass_partial")."""
        return f"paged_attention_{'ck_' if self.k.channel else ''}{stage}{'_mass' if mass else ''}"


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
        if fmt.dtype not in FLOAT_DTYPES and not (fmt.channel and fmt.dtype in CHANNEL_META_DTYPES):
            raise Unsupported(f"{which} pool dtype {fmt.dtype}")
        if fmt.channel:
            if which == "V":
                raise Unsupported("V pool quantized per channel: kernels read per-channel keys only")
            if fmt.bits not in QUANT_BITS or fmt.tail_dtype not in FLOAT_DTYPES:
                raise Unsupported(f"per-channel K pool {fmt.bits}-bit, tail {fmt.tail_dtype}: kernels exist for "
                                  f"{QUANT_BITS} bits and float tails")
            if k_pool.n_sinks and (k_pool.sinks.ndim != 4 or k_pool.sinks.shape[1:] != (h_kv, k_pool.n_sinks, D)):
                raise Unsupported(f"sink keys {k_pool.sinks.shape} for {k_pool.n_sinks} sinks of {h_kv} heads")
            fmts.append(fmt)
            continue
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


def attended_len(max_len: int, window: int | None, block_size: int) -> int:
    """Most rows a sequence's threadgroups walk: with a window W the walk starts at the block holding the first
    visible row, so at most W + BS - 1 rows (a split plan over this span never gets splits before a window)."""
    return max_len if window is None else max(1, min(max_len, window + block_size - 1))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split(max_len: int, n: int, block_size: int) -> tuple[int, int]:
    partition = _cdiv(_cdiv(max_len, n), block_size) * block_size
    return _cdiv(max_len, partition), partition


def _operands(pool) -> list[mx.array]:
    if isinstance(pool, ChannelKeyPool):
        return [pool.packed, pool.scales, pool.biases, pool.tail, pool.sinks, pool.slots.astype(mx.int32)]
    if is_quantized(pool):
        return list(pool)
    # The kernel never reads scales/biases of a float pool. The placeholder is made here, on the calling
    # thread: MLX streams are per thread, and a module-level array would be built on the importing thread
    # and fail when first evaluated on the engine thread (tests/metal_sim/test_fresh_process.py).
    dummy = mx.zeros((1,), dtype=mx.float16)
    return [pool, dummy, dummy]


def paged_attention_metal(q: mx.array, k_pool, v_pool, block_tables: mx.array, context_lens: mx.array,
                          scale: float, max_len: int | None = None, two_pass: bool | None = None,
                          return_mass: bool = False, *, window: int | None = None, sinks: mx.array | None = None):
    """Decode attention with the Metal kernels; same contract as `paged_attention_reference_quantized`.

    Args:
        two_pass: force the split-context kernels (True) or the one-pass kernel (False); None = heuristic.
        return_mass: also return the attention mass per block-table entry, [B, max_blocks] float32.
        window: sliding window W (each sequence sees its last W rows; blocks wholly before them are not read,
            and the splits of the two-pass kernels cover only [first visible block, end)), None = all.
        sinks: float32 [n_heads] attention-sink logits, or None. Folded into the final normalisation:
            out = acc / (l + exp(sink - m)), which equals attention with the sink logit as one more softmax
            column with no value (gpt-oss; the `sinks` of mx.fast.scaled_dot_product_attention), i.e. the
            sink-free output times sigmoid(lse - sink).
    Raises:
        Unsupported: no variant covers the inputs.
    """
    var = select_variant(q, k_pool, v_pool, block_tables)
    B, n_heads, _, D = q.shape
    if two_pass is not False and max_len is None:
        max_len = int(context_lens.max().item())  # a device sync; callers usually know it
    two_pass, n_splits, partition = choose_passes(B * n_heads, attended_len(max_len or 1, window, var.block_size),
                                                  var.block_size, two_pass)
    # Made on the calling thread (MLX streams are per thread): no module-level placeholder
    sink_logits = mx.zeros((1,), mx.float32) if sinks is None else sinks.astype(mx.float32)
    win = 0 if window is None else int(window)
    lens = context_lens.astype(mx.int32)
    inputs = [q, *_operands(k_pool), *_operands(v_pool), block_tables.astype(mx.int32), lens, float(scale), win,
              sink_logits]
    template = var.template(sinks is not None)
    threads = NSG * 32
    bh, max_blocks = B * n_heads, block_tables.shape[1]
    # mass: (max, sum) per head and split, and per block-table entry (running max, exp2 sum)
    extra_shapes = [(bh, 1 if not two_pass else n_splits, 2), (bh, max_blocks, 2)] if return_mass else []
    extra_dtypes = [mx.float32, mx.float32] if return_mass else []
    if not two_pass:
        kernel = registry.get_kernel(var.kernel("1pass", return_mass))
        outs = kernel(inputs=inputs, template=template, grid=(threads * B * n_heads, 1, 1),
                      threadgroup=(threads, 1, 1), output_shapes=[q.shape] + extra_shapes,
                      output_dtypes=[q.dtype] + extra_dtypes)
        out = outs[0]
    else:
        partial = registry.get_kernel(var.kernel("2pass_partial", return_mass))
        outs = partial(inputs=inputs + [partition], template=template,
                       grid=(threads * B * n_heads, n_splits, 1), threadgroup=(threads, 1, 1),
                       output_shapes=[(B * n_heads, n_splits, D), (B * n_heads, n_splits, 2)] + extra_shapes[1:],
                       output_dtypes=[mx.float32, mx.float32] + extra_dtypes[1:])
        o_part = outs[0]
        reduce = registry.get_kernel("paged_attention_2pass_reduce")
        out = reduce(inputs=[o_part, outs[1], sink_logits], template=[("T", q.dtype), ("D", D),
                                                                     ("SL", int(sinks is not None))],
                     grid=(REDUCE_THREADS * B * n_heads, 1, 1), threadgroup=(REDUCE_THREADS, 1, 1),
                     output_shapes=[q.shape], output_dtypes=[q.dtype])[0]
    if not return_mass:
        return out
    ml, bstats = outs[1], outs[2]
    mass_kernel = registry.get_kernel("paged_attention_mass")
    mass = mass_kernel(inputs=[bstats, ml, lens, win, sink_logits],
                       template=[("BS", var.block_size), ("SL", int(sinks is not None))],
                       grid=(max_blocks, B, 1), threadgroup=(max(1, min(MASS_THREADS, max_blocks)), 1, 1),
                       output_shapes=[(B, max_blocks)], output_dtypes=[mx.float32])[0]
    return out, mass
