"""The paged KV pool: per layer one K and one V array shaped [num_blocks, n_kv_heads, block_size, head_dim],
or for quantized KV the `mx.quantize`-style triple (packed, scales, biases) of each (kernels/kv_quant.py).

Writes are MLX scatters (indexed assignment), which MLX performs in place when the pool array has no other
reference (design.md §2): this object holds the only long-lived reference to each array.

Concerns apart: per-channel key slabs in `channel_keys.py`, block export/import in `block_bytes.py`, the write
plan in `write_plan.py` (re-exported here).
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx

from ..kernels.kv_format import ChannelKeyPool, QuantizedPool
from ..kernels.kv_quant import SCALE_DTYPE, QuantSpec, dequantize_channels, dequantize_tokens, quantize_tokens
from ..kernels.reference_quant import qmm_supported, quantized_decode_attention
from .block_bytes import BlockBytes
from .channel_keys import ChannelKeySlabs
from .write_plan import WritePlan, scatter

__all__ = ["KVPool", "WritePlan"]


class KVPool(ChannelKeySlabs, BlockBytes):
    """Per-layer K/V block arrays.

    Args:
        n_layers, num_blocks, n_kv_heads, block_size, head_dim: pool geometry.
        dtype: float storage dtype (float16, bfloat16 or float32); for a quantized pool, the dtype of the
            full-precision tail slab and of dequantized reads.
        quant: a `QuantSpec`, or None for float storage.
    """

    def __init__(self, n_layers: int, num_blocks: int, n_kv_heads: int, block_size: int, head_dim: int,
                 dtype: mx.Dtype, quant: QuantSpec | None = None):
        self.n_layers = n_layers
        self.num_blocks = num_blocks
        self.n_kv_heads = n_kv_heads
        self.block_size = block_size
        self.head_dim = head_dim
        self.dtype = dtype
        if quant is not None and quant.group_size > head_dim:  # tiny test models
            quant = dataclasses.replace(quant, group_size=head_dim)
        self.quant = quant
        nb, h, bs, d = num_blocks, n_kv_heads, block_size, head_dim
        if quant is None:
            self.k = [mx.zeros((nb, h, bs, d), dtype=dtype) for _ in range(n_layers)]
            self.v = [mx.zeros((nb, h, bs, d), dtype=dtype) for _ in range(n_layers)]
        else:
            g = quant.group_size
            k_meta = (nb, h, 1, d) if quant.k_channel else (nb, h, bs, d // g)
            self.k = [_triple((nb, h, bs, d * quant.k_bits // 32), k_meta, quant.k_meta_dtype)
                      for _ in range(n_layers)]
            self.v = [_triple((nb, h, bs, d * quant.v_bits // 32), (nb, h, bs, d // g)) for _ in range(n_layers)]
        mx.eval(self.k, self.v)
        # [1, H]: broadcast against [N, 1] block/offset indices to address every head of a row.
        self._heads = mx.arange(n_kv_heads)[None, :]
        self._init_slabs()

    # -- format and size ------------------------------------------------------------------------------
    @property
    def format_name(self) -> str:
        """Names everything that determines the stored bytes (goes into the block-hash root and session files)."""
        base = f"{str(self.dtype).split('.')[-1]};block={self.block_size}"
        return base if self.quant is None else f"{base};{self.quant.name(self.block_size)}"

    @staticmethod
    def bytes_per_block(n_layers: int, n_kv_heads: int, block_size: int, head_dim: int, dtype: mx.Dtype,
                        quant: QuantSpec | None = None) -> int:
        """Bytes of K and V for one block across all layers (scales and biases included)."""
        if quant is None:
            return 2 * n_layers * n_kv_heads * block_size * head_dim * dtype.size
        return int(round(n_layers * block_size * quant.bytes_per_row(n_kv_heads, head_dim, block_size)))

    @property
    def total_bytes(self) -> int:
        """Bytes held by the pool arrays (and the tail and sink slabs)."""
        slab = sum(a.nbytes for a in self.tail_k + self.sink_k)
        return self.bytes_per_block(self.n_layers, self.n_kv_heads, self.block_size, self.head_dim,
                                    self.dtype, self.quant) * self.num_blocks + slab

    def k_pool(self, layer: int):
        """Layer's K pool as the kernels take it: an array, a `QuantizedPool` (token layout) or a `ChannelKeyPool`
        (per-channel keys with this layer's tail and sink slabs and the block -> slot table)."""
        if self.quant is None:
            return self.k[layer]
        if not self.quant.k_channel:
            return QuantizedPool(*self.k[layer])
        sinks = self.sink_k[layer] if self.sink_k else _dummy(self.dtype, (1, self.n_kv_heads, self.quant.sinks,
                                                                           self.head_dim))
        return ChannelKeyPool(*self.k[layer], self.tail_k[layer], sinks, self.slot_table(), self.quant.sinks)

    def v_pool(self, layer: int):
        return self.v[layer] if self.quant is None else QuantizedPool(*self.v[layer])

    # -- writes ---------------------------------------------------------------------------------------
    def plan_write(self, blocks: list[int], offsets: list[int], positions: list[int] | None = None) -> WritePlan:
        """Prepares the writes of one forward pass (rows in token order per sequence).

        Assigns tail-slab slots for per-channel keys: a block's slot lives until the block fills.
        positions: each row's position in its sequence (None: no sink keys are kept).
        """
        plan = WritePlan(mx.array(blocks, dtype=mx.int32), mx.array(offsets, dtype=mx.int32))
        if len(blocks) == 1:
            plan.row = (int(blocks[0]), int(offsets[0]))
        if self.quant is None or not self.quant.k_channel:
            return plan
        self._plan_channel_keys(plan, blocks, offsets, positions)
        return plan

    def write(self, layer: int, keys: mx.array, values: mx.array, plan: WritePlan) -> None:
        """Stores new rows.

        Args:
            keys, values: [N, n_kv_heads, head_dim] rows for N token positions.
            plan: where they go (`plan_write`; the slot mapping of the step, the same for every layer).
        """
        q = self.quant
        if q is None and plan.row is not None:
            # One row (a single sequence's decode step): a slice update at Python-int indices costs ~0.35 ms less
            # a step than the scatter below (30 layers; docs/experiments/ab_cache_shim.py, w/decode9).
            blk, off = plan.row
            self.k[layer][blk, :, off] = keys[0].astype(self.dtype)
            self.v[layer][blk, :, off] = values[0].astype(self.dtype)
            return
        if plan.cols is None:
            plan.cols = (plan.blocks[:, None], plan.offsets[:, None])
        b, o = plan.cols
        if q is None:
            self.k[layer][b, self._heads, o] = keys.astype(self.dtype)
            self.v[layer][b, self._heads, o] = values.astype(self.dtype)
            return
        scatter(self.v[layer], (b, self._heads, o), quantize_tokens(values, q.v_bits, q.group_size))
        if not q.k_channel:
            scatter(self.k[layer], (b, self._heads, o), quantize_tokens(keys, q.k_bits, q.group_size))
            return
        self._write_channel_keys(layer, keys, plan)

    # -- reads ----------------------------------------------------------------------------------------
    def gather(self, layer: int, block_table, length: int) -> tuple[mx.array, mx.array]:
        """One sequence's first `length` K/V rows as [1, n_kv_heads, length, head_dim] each.

        Quantized pools dequantize only this sequence's blocks (into `dtype`).
        """
        if self.quant is None:
            table = block_table if isinstance(block_table, mx.array) else mx.array(block_table, dtype=mx.int32)
            return (_contiguous(self.k[layer], table, length), _contiguous(self.v[layer], table, length))
        q, bs = self.quant, self.block_size
        ids = block_table.tolist() if isinstance(block_table, mx.array) else list(block_table)
        ids = ids[: -(-length // bs)]
        idx = mx.array(ids, dtype=mx.int32)
        pv, sv, bv = self.v[layer]
        v = dequantize_tokens(pv[idx], sv[idx], bv[idx], q.v_bits, q.group_size, self.dtype)
        pk, sk, bk = self.k[layer]
        if not q.k_channel:
            k = dequantize_tokens(pk[idx], sk[idx], bk[idx], q.k_bits, q.group_size, self.dtype)
        elif ids[-1] not in self._slot:  # every block read is full (only partial blocks have slab rows)
            k = dequantize_channels(pk[idx], sk[idx], bk[idx], q.k_bits, self.dtype)
        else:
            full = idx[:-1]
            tail = self.tail_k[layer][self._slot[ids[-1]]][None]
            k = tail if len(ids) == 1 else mx.concatenate(
                [dequantize_channels(pk[full], sk[full], bk[full], q.k_bits, self.dtype), tail])
        k = _rows(k, length)
        if q.sinks and ids[0] in self._sink_slot:
            n = min(q.sinks, length)
            sink = self.sink_k[layer][self._sink_slot[ids[0]]][None, :, :n]
            k = sink if length <= n else mx.concatenate([sink, k[:, :, n:]], axis=2)
        return k, _rows(v, length)

    @property
    def reads_quantized(self) -> bool:
        """True when CPU decode can read this quantized pool directly (`decode_attention`)."""
        return self.quant is not None and qmm_supported(self.head_dim, self.quant.group_size, self.quant.k_channel)

    def decode_attention(self, layer: int, q: mx.array, block_table, length: int, scale: float, *,
                         window: int | None = None, sinks: mx.array | None = None) -> mx.array:
        """One sequence's decode attention over its first `length` positions, read from the quantized blocks
        (`quantized_decode_attention`: no dequantized copy of K/V). q: [1, n_heads, 1, head_dim].
        window, sinks: sliding window and attention-sink logits (as `models.attention.attend`)."""
        qs, bs = self.quant, self.block_size
        ids = list(block_table)[: -(-length // bs)]
        sinks_logits, tail, sinks = sinks, None, None
        if qs.k_channel:
            if ids[-1] in self._slot:
                tail = self.tail_k[layer][self._slot[ids[-1]]]
            if qs.sinks and ids[0] in self._sink_slot:
                sinks = self.sink_k[layer][self._sink_slot[ids[0]]][:, : min(qs.sinks, length)]
        return quantized_decode_attention(q, self.k[layer], self.v[layer], ids, length, scale, k_bits=qs.k_bits,
                                          v_bits=qs.v_bits, group_size=qs.group_size, k_channel=qs.k_channel,
                                          tail=tail, sink_keys=sinks, window=window, sinks=sinks_logits)


_DUMMIES: dict = {}


def _dummy(dtype: mx.Dtype, shape: tuple) -> mx.array:
    # stands in for the sink slab before any sequence has sink keys (no slot refers to it)
    if not shape[2]:
        shape = (1,)
    key = (dtype, shape)
    if key not in _DUMMIES:
        _DUMMIES[key] = mx.zeros(shape, dtype=dtype)
    return _DUMMIES[key]


def _triple(packed_shape, meta_shape, meta_dtype=SCALE_DTYPE) -> list[mx.array]:
    return [mx.zeros(packed_shape, dtype=mx.uint32), mx.zeros(meta_shape, dtype=meta_dtype),
            mx.zeros(meta_shape, dtype=meta_dtype)]


def _rows(x: mx.array, length: int) -> mx.array:
    # [nb, H, BS, D] -> [1, H, length, D]
    nb, h, bs, d = x.shape
    return x.transpose(1, 0, 2, 3).reshape(h, nb * bs, d)[None, :, :length, :]


def _contiguous(pool: mx.array, block_table: mx.array, length: int) -> mx.array:
    # pool[block_table]: [nb, H, BS, D] -> [H, nb*BS, D] -> first `length` rows, batch axis added.
    return _rows(pool[block_table], length)
