"""The paged KV pool: per layer one K and one V array shaped [num_blocks, n_kv_heads, block_size, head_dim],
or for quantized KV the `mx.quantize`-style triple (packed, scales, biases) of each (kernels/kv_quant.py).

Writes are MLX scatters (indexed assignment), which MLX performs in place when the pool array has no other
reference (design.md §2): this object holds the only long-lived reference to each array.

Keys quantized per channel (`QuantSpec.k_channel`) are quantized a whole block at a time: rows of a block that is
not yet full go to a small full-precision "tail slab" (one slot per partial block) and the block is quantized
from the slab plus its last rows when it fills.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..kernels.kv_format import ChannelKeyPool, QuantizedPool
from ..kernels.reference_quant import qmm_supported, quantized_decode_attention
from ..kernels.kv_quant import (SCALE_DTYPE, QuantSpec, dequantize_channels, dequantize_tokens, quantize_channels,
                                quantize_tokens)


@dataclass(slots=True)
class WritePlan:
    """Where one forward pass's N new rows go (the same for every layer).

    blocks, offsets: [N] int32 block id and in-block offset of each row.
    For per-channel keys: `tail_*` rows go to the slab; `full_rows`/`full_ids` cover whole blocks written at once;
    `completions` are (slot, first offset, row start, row end, block id) of blocks that fill in this write.
    """

    blocks: mx.array
    offsets: mx.array
    tail_rows: mx.array | None = None
    tail_slots: mx.array | None = None
    tail_offsets: mx.array | None = None
    full_rows: mx.array | None = None
    full_ids: mx.array | None = None
    full_sink: list = field(default_factory=list)  # per full block: it is a first block (has sink rows)
    completions: list = field(default_factory=list)
    sink_rows: mx.array | None = None  # rows at positions < sinks, and their sink-slab slots and offsets
    sink_slots: mx.array | None = None
    sink_offsets: mx.array | None = None
    cols: tuple | None = None  # (blocks[:, None], offsets[:, None]), made once for all layers


class KVPool:
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
            self.k = [_triple((nb, h, bs, d * quant.k_bits // 32), k_meta) for _ in range(n_layers)]
            self.v = [_triple((nb, h, bs, d * quant.v_bits // 32), (nb, h, bs, d // g)) for _ in range(n_layers)]
        mx.eval(self.k, self.v)
        # [1, H]: broadcast against [N, 1] block/offset indices to address every head of a row.
        self._heads = mx.arange(n_kv_heads)[None, :]
        # Per-channel keys: full-precision rows of partial blocks, [slots, H, BS, D] per layer.
        self.tail_k: list[mx.array] = []
        self._slot: dict[int, int] = {}  # block id -> slab slot
        self._free_slots: list[int] = []
        # Sinks: full-precision keys of the first positions, [slots, H, sinks, D] per layer, for first blocks.
        self.sink_k: list[mx.array] = []
        self._sink_slot: dict[int, int] = {}
        self._free_sinks: list[int] = []
        self._slot_map: mx.array | None = None  # [num_blocks, 2] tail and sink slot per block id (kernels)
        if quant is not None and quant.k_channel:
            self._grow_slab(4)

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

    @property
    def has_kernel(self) -> bool:
        """True: the Metal kernels read every layout (per-channel keys through `ChannelKeyPool`)."""
        return True

    def slot_table(self) -> mx.array:
        """[num_blocks, 2] int32: each block id's tail-slab slot and sink-slab slot (-1: none), as
        `KVPool.gather` uses them: the tail slot for a sequence's last block, the sink slot for its first."""
        if self._slot_map is None:
            table = np.full((self.num_blocks, 2), -1, np.int32)
            for col, slots in enumerate((self._slot, self._sink_slot)):
                if slots:
                    table[np.fromiter(slots.keys(), np.int64, len(slots)), col] = list(slots.values())
            self._slot_map = mx.array(table)
        return self._slot_map

    # -- writes ---------------------------------------------------------------------------------------
    def plan_write(self, blocks: list[int], offsets: list[int], positions: list[int] | None = None) -> WritePlan:
        """Prepares the writes of one forward pass (rows in token order per sequence).

        Assigns tail-slab slots for per-channel keys: a block's slot lives until the block fills.
        positions: each row's position in its sequence (None: no sink keys are kept).
        """
        plan = WritePlan(mx.array(blocks, dtype=mx.int32), mx.array(offsets, dtype=mx.int32))
        if self.quant is None or not self.quant.k_channel:
            return plan
        self._slot_map = None  # slots change below
        bs = self.block_size
        if positions is not None:
            self._plan_sinks(plan, blocks, offsets, positions)
        tail_rows, tail_slots, tail_offs, full_rows, full_ids = [], [], [], [], []
        i, n = 0, len(blocks)
        while i < n:  # one segment = consecutive rows of one block
            j = i + 1
            while j < n and blocks[j] == blocks[i] and offsets[j] == offsets[j - 1] + 1:
                j += 1
            b, o0, o1 = blocks[i], offsets[i], offsets[j - 1] + 1
            if o1 == bs and o0 == 0:
                self.drop_tail(b)
                full_rows.extend(range(i, j))
                full_ids.append(b)
                plan.full_sink.append(b in self._sink_slot)
            elif o1 == bs:
                slot = self._slot.pop(b, None)
                if slot is None:
                    raise AssertionError(f"block {b} fills at offset {o0} but has no tail rows")
                plan.completions.append((slot, o0, i, j, b, b in self._sink_slot))
                self._free_slots.append(slot)
            else:
                if o0 == 0 or b not in self._slot:
                    self.drop_tail(b)
                    self._slot[b] = self._take_slot()
                tail_rows.extend(range(i, j))
                tail_slots.extend([self._slot[b]] * (j - i))
                tail_offs.extend(range(o0, o1))
            i = j
        if tail_rows:
            plan.tail_rows = mx.array(tail_rows, dtype=mx.int32)
            plan.tail_slots = mx.array(tail_slots, dtype=mx.int32)
            plan.tail_offsets = mx.array(tail_offs, dtype=mx.int32)
        if full_rows:
            plan.full_rows = mx.array(full_rows, dtype=mx.int32)
            plan.full_ids = mx.array(full_ids, dtype=mx.int32)
        return plan

    def write(self, layer: int, keys: mx.array, values: mx.array, blocks, offsets: mx.array | None = None) -> None:
        """Stores new rows.

        Args:
            keys, values: [N, n_kv_heads, head_dim] rows for N token positions.
            blocks: a `WritePlan`, or [N] int32 block ids with `offsets` [N] int32 in-block offsets.
        """
        plan = blocks if isinstance(blocks, WritePlan) else WritePlan(blocks, offsets)
        if plan.cols is None:
            plan.cols = (plan.blocks[:, None], plan.offsets[:, None])
        b, o = plan.cols
        q = self.quant
        if q is None:
            self.k[layer][b, self._heads, o] = keys.astype(self.dtype)
            self.v[layer][b, self._heads, o] = values.astype(self.dtype)
            return
        _scatter(self.v[layer], (b, self._heads, o), quantize_tokens(values, q.v_bits, q.group_size))
        if not q.k_channel:
            _scatter(self.k[layer], (b, self._heads, o), quantize_tokens(keys, q.k_bits, q.group_size))
            return
        self._write_channel_keys(layer, keys, plan)

    def _write_channel_keys(self, layer: int, keys: mx.array, plan: WritePlan) -> None:
        bs, h, d = self.block_size, self.n_kv_heads, self.head_dim
        slab = self.tail_k[layer]
        blocks, ids, sink = [], [], []
        # Blocks that fill now: earlier rows from the slab (read before this write's tail rows reuse a slot).
        for slot, o0, r0, r1, b, has_sink in plan.completions:
            new = keys[r0:r1].transpose(1, 0, 2).astype(slab.dtype)  # [H, n, D]
            blocks.append(mx.concatenate([slab[slot, :, :o0], new], axis=1) if o0 else new)
            ids.append(b)
            sink.append(has_sink)
        if blocks:
            _scatter(self.k[layer], (mx.array(ids, dtype=mx.int32),), self._quantize_keys(mx.stack(blocks), sink))
        if plan.full_rows is not None:
            # [nf*BS, H, D] -> [nf, H, BS, D]
            x = keys[plan.full_rows].reshape(-1, bs, h, d).transpose(0, 2, 1, 3)
            _scatter(self.k[layer], (plan.full_ids,), self._quantize_keys(x, plan.full_sink))
        if plan.sink_rows is not None:
            self.sink_k[layer][plan.sink_slots[:, None], self._heads, plan.sink_offsets[:, None]] = \
                keys[plan.sink_rows].astype(self.dtype)
        if plan.tail_rows is not None:
            slab[plan.tail_slots[:, None], self._heads, plan.tail_offsets[:, None]] = \
                keys[plan.tail_rows].astype(slab.dtype)

    def _quantize_keys(self, x: mx.array, sink: list[bool]):
        # x: [n, H, BS, D]. Sink rows of first blocks are stored apart: give them the next row's values so that
        # they do not widen the block's per-channel ranges.
        s = self.quant.sinks
        if s and any(sink):
            rows = (mx.arange(self.block_size) < s)[None, None, :, None] & mx.array(sink)[:, None, None, None]
            x = mx.where(rows, x[:, :, s:s + 1], x)
        return quantize_channels(x, self.quant.k_bits)

    def _plan_sinks(self, plan: WritePlan, blocks, offsets, positions) -> None:
        s = self.quant.sinks
        if not s:
            return
        rows, slots, offs = [], [], []
        for i, (b, o, p) in enumerate(zip(blocks, offsets, positions)):
            if o == 0 and p != 0:
                self._drop_sink(b)  # the block now holds other positions
            if p < s:
                if p == 0 or b not in self._sink_slot:
                    self._drop_sink(b)
                    self._sink_slot[b] = self._take_sink()
                rows.append(i)
                slots.append(self._sink_slot[b])
                offs.append(o)
        if rows:
            plan.sink_rows = mx.array(rows, dtype=mx.int32)
            plan.sink_slots = mx.array(slots, dtype=mx.int32)
            plan.sink_offsets = mx.array(offs, dtype=mx.int32)

    def _drop_sink(self, block_id: int) -> None:
        self._slot_map = None
        slot = self._sink_slot.pop(block_id, None)
        if slot is not None:
            self._free_sinks.append(slot)

    def _take_sink(self) -> int:
        if not self._free_sinks:
            old = self.sink_k[0].shape[0] if self.sink_k else 0
            n = max(4, 2 * old)
            shape = (n - old, self.n_kv_heads, self.quant.sinks, self.head_dim)
            extra = [mx.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
            self.sink_k = extra if not self.sink_k else [mx.concatenate([a, e]) for a, e in zip(self.sink_k, extra)]
            self._free_sinks.extend(range(n - 1, old - 1, -1))
        return self._free_sinks.pop()

    # -- tail slab ------------------------------------------------------------------------------------
    def drop_tail(self, block_id: int) -> None:
        """Forgets the full-precision rows of a partial block (its sequence ended or the block was reused)."""
        self._slot_map = None
        slot = self._slot.pop(block_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    def tail_blocks(self) -> list[int]:
        return list(self._slot)

    def _take_slot(self) -> int:
        if not self._free_slots:
            self._grow_slab(2 * self.tail_k[0].shape[0])
        return self._free_slots.pop()

    def _grow_slab(self, n: int) -> None:
        old = self.tail_k[0].shape[0] if self.tail_k else 0
        shape = (n - old, self.n_kv_heads, self.block_size, self.head_dim)
        extra = [mx.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        self.tail_k = extra if not self.tail_k else [mx.concatenate([a, e]) for a, e in zip(self.tail_k, extra)]
        self._free_slots.extend(range(n - 1, old - 1, -1))

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

    def decode_attention(self, layer: int, q: mx.array, block_table, length: int, scale: float) -> mx.array:
        """One sequence's decode attention over its first `length` positions, read from the quantized blocks
        (`quantized_decode_attention`: no dequantized copy of K/V). q: [1, n_heads, 1, head_dim]."""
        qs, bs = self.quant, self.block_size
        ids = list(block_table)[: -(-length // bs)]
        tail = sinks = None
        if qs.k_channel:
            if ids[-1] in self._slot:
                tail = self.tail_k[layer][self._slot[ids[-1]]]
            if qs.sinks and ids[0] in self._sink_slot:
                sinks = self.sink_k[layer][self._sink_slot[ids[0]]][:, : min(qs.sinks, length)]
        return quantized_decode_attention(q, self.k[layer], self.v[layer], ids, length, scale, k_bits=qs.k_bits,
                                          v_bits=qs.v_bits, group_size=qs.group_size, k_channel=qs.k_channel,
                                          tail=tail, sinks=sinks)

    def read_blocks(self, block_ids: list[int]) -> list[tuple[mx.array, mx.array]]:
        """Copies of the given blocks for every layer (float pools; quantized pools give their triples)."""
        idx = mx.array(block_ids, dtype=mx.int32)
        if self.quant is None:
            return [(self.k[i][idx], self.v[i][idx]) for i in range(self.n_layers)]
        return [(tuple(a[idx] for a in self.k[i]), tuple(a[idx] for a in self.v[i])) for i in range(self.n_layers)]

    # -- export / import of full blocks (SSD tier, session files) --------------------------------------
    @property
    def sink_section_bytes(self) -> int:
        """Bytes at the end of each exported K row holding the sink flag and sink keys (0 without sinks)."""
        if self.quant is None or not self.quant.sinks:
            return 0
        return 4 + self.n_kv_heads * self.quant.sinks * self.head_dim * self.dtype.size

    def block_layout(self) -> tuple[tuple[tuple[int, ...], str], tuple[tuple[int, ...], str]]:
        """Shape and numpy dtype name of one block's exported K and of its V, per layer (as `export_blocks`
        gives them without the block axis).

        Returns:
            ((k_shape, k_dtype), (v_shape, v_dtype)). Float pools: (H, BS, D) in the pool dtype (bfloat16 as
            "uint16") for both; quantized pools: ((k_bytes,), "uint8"), ((v_bytes,), "uint8"), where K and V
            differ whenever their bits or layouts differ (int4 with per-channel keys, k8v4).
        """
        if self.quant is None:
            name = "uint16" if self.dtype == mx.bfloat16 else str(self.dtype).split(".")[-1]
            shape = (self.n_kv_heads, self.block_size, self.head_dim)
            return (shape, name), (shape, name)

        def nbytes(arrays) -> int:
            return sum(int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.size for a in arrays)

        k = nbytes(self.k[0]) + self.sink_section_bytes
        return ((k,), "uint8"), ((nbytes(self.v[0]),), "uint8")

    def export_blocks(self, block_ids: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Stored bytes of full blocks, per layer: K and V numpy arrays with the block axis first.

        Float pools: [n, H, BS, D] (bfloat16 as raw uint16). Quantized pools: uint8 [n, bytes] (packed, scales
        and biases of each block concatenated). `import_blocks` is the inverse for a pool of the same format.
        """
        idx = mx.array(block_ids, dtype=mx.int32)
        ks, vs = [], []
        for layer in range(self.n_layers):
            for src, dst in ((self.k[layer], ks), (self.v[layer], vs)):
                if self.quant is None:
                    a = src[idx]
                    if a.dtype == mx.bfloat16:
                        a = a.view(mx.uint16)
                    dst.append(np.array(a))
                else:
                    parts = [_bytes(a[idx], len(block_ids)) for a in src]
                    if src is self.k[layer] and self.quant.sinks:
                        parts += self._export_sinks(layer, block_ids)
                    dst.append(np.concatenate(parts, axis=1))
        return ks, vs

    def _export_sinks(self, layer: int, block_ids: list[int]) -> list[np.ndarray]:
        # per block: a uint32 flag (1 = first block with sink keys) and the sink keys in `dtype`
        shape = (self.n_kv_heads, self.quant.sinks, self.head_dim)
        rows = [self.sink_k[layer][self._sink_slot[b]] if b in self._sink_slot else mx.zeros(shape, self.dtype)
                for b in block_ids]
        flags = mx.array([int(b in self._sink_slot) for b in block_ids], dtype=mx.uint32)
        return [_bytes(flags, len(block_ids)), _bytes(mx.stack(rows), len(block_ids))]

    def import_blocks(self, block_ids: list[int], ks: list[np.ndarray], vs: list[np.ndarray]) -> None:
        """Writes blocks exported by `export_blocks` (same format) into the given block ids."""
        idx = mx.array(block_ids, dtype=mx.int32)
        n = len(block_ids)
        for layer in range(self.n_layers):
            for dst, data in ((self.k[layer], ks[layer]), (self.v[layer], vs[layer])):
                if self.quant is None:
                    a = mx.array(data)
                    if self.dtype == mx.bfloat16:
                        a = a.view(mx.bfloat16)
                    dst[idx] = a.astype(self.dtype)
                    continue
                data = np.ascontiguousarray(data).reshape(n, -1)
                at = 0
                for i, a in enumerate(dst):
                    dst[i][idx] = _from_bytes(data, at, n, a.dtype, a.shape[1:])
                    at += a[0].nbytes
                for b in block_ids:
                    self.drop_tail(b)
                if dst is self.k[layer] and self.quant.sinks:
                    flags = np.array(_from_bytes(data, at, n, mx.uint32, ()))
                    shape = (self.n_kv_heads, self.quant.sinks, self.head_dim)
                    rows = _from_bytes(data, at + 4, n, self.dtype, shape)
                    for i, b in enumerate(block_ids):
                        if layer == 0:
                            self._drop_sink(b)
                            if flags[i]:
                                self._sink_slot[b] = self._take_sink()
                        if flags[i]:
                            self.sink_k[layer][self._sink_slot[b]] = rows[i]
        self._slot_map = None
        mx.eval(self.k, self.v)


_DUMMIES: dict = {}


def _dummy(dtype: mx.Dtype, shape: tuple) -> mx.array:
    # stands in for the sink slab before any sequence has sink keys (no slot refers to it)
    if not shape[2]:
        shape = (1,)
    key = (dtype, shape)
    if key not in _DUMMIES:
        _DUMMIES[key] = mx.zeros(shape, dtype=dtype)
    return _DUMMIES[key]


def _triple(packed_shape, meta_shape) -> list[mx.array]:
    return [mx.zeros(packed_shape, dtype=mx.uint32), mx.zeros(meta_shape, dtype=SCALE_DTYPE),
            mx.zeros(meta_shape, dtype=SCALE_DTYPE)]


def _scatter(dst: list[mx.array], index: tuple, parts) -> None:
    for i, p in enumerate(parts):
        dst[i][index] = p


def _bytes(a: mx.array, n: int) -> np.ndarray:
    # [n, ...] -> uint8 [n, bytes] (bfloat16 through its raw bits)
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a).reshape(n, -1)).view(np.uint8)


def _from_bytes(data: np.ndarray, at: int, n: int, dtype: mx.Dtype, shape: tuple) -> mx.array:
    per = int(np.prod(shape, dtype=np.int64)) * dtype.size
    a = mx.array(data[:, at:at + per].copy().view(_np_dtype(dtype)).reshape(n, *shape))
    return a.view(mx.bfloat16) if dtype == mx.bfloat16 else a


def _np_dtype(dtype: mx.Dtype):
    return {mx.uint32: np.uint32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.float32: np.float32}[dtype]


def _rows(x: mx.array, length: int) -> mx.array:
    # [nb, H, BS, D] -> [1, H, length, D]
    nb, h, bs, d = x.shape
    return x.transpose(1, 0, 2, 3).reshape(h, nb * bs, d)[None, :, :length, :]


def _contiguous(pool: mx.array, block_table: mx.array, length: int) -> mx.array:
    # pool[block_table]: [nb, H, BS, D] -> [H, nb*BS, D] -> first `length` rows, batch axis added.
    return _rows(pool[block_table], length)
