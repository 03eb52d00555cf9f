"""Keys quantized per channel (`QuantSpec.k_channel`): the full-precision slabs beside the quantized blocks.

Keys are quantized a whole block at a time: rows of a block that is not yet full go to a small full-precision
"tail slab" (one slot per partial block) and the block is quantized from the slab plus its last rows when it
fills. The keys of the first `sinks` positions stay in full precision in a "sink slab" (one slot per first block).
`ChannelKeySlabs` is the part of `KVPool` that owns both slabs.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..kernels.kv_quant import quantize_channels
from .write_plan import WritePlan, scatter


class ChannelKeySlabs:
    """Tail and sink slabs of a `KVPool` with per-channel keys (mixed into `KVPool`; uses its geometry)."""

    def _init_slabs(self) -> None:
        # Per-channel keys: full-precision rows of partial blocks, [slots, H, BS, D] per layer.
        self.tail_k: list[mx.array] = []
        self._slot: dict[int, int] = {}  # block id -> slab slot
        self._free_slots: list[int] = []
        # Sinks: full-precision keys of the first positions, [slots, H, sinks, D] per layer, for first blocks.
        self.sink_k: list[mx.array] = []
        self._sink_slot: dict[int, int] = {}
        self._free_sinks: list[int] = []
        self._slot_map: mx.array | None = None  # [num_blocks, 2] tail and sink slot per block id (kernels)
        # Sink blocks moved by a policy: float32 keys per layer [H, BS, D] (storage/key_shift.py)
        self._key_master: dict[int, list[mx.array]] = {}
        if self.quant is not None and self.quant.k_channel:
            self._grow_slab(4)

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

    def _plan_channel_keys(self, plan: WritePlan, blocks: list[int], offsets: list[int],
                           positions: list[int] | None) -> None:
        # Assigns slab slots: rows of partial blocks go to the tail slab, whole or filling blocks get quantized.
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
            scatter(self.k[layer], (mx.array(ids, dtype=mx.int32),), self._quantize_keys(mx.stack(blocks), sink))
        if plan.full_rows is not None:
            # [nf*BS, H, D] -> [nf, H, BS, D]
            x = keys[plan.full_rows].reshape(-1, bs, h, d).transpose(0, 2, 1, 3)
            scatter(self.k[layer], (plan.full_ids,), self._quantize_keys(x, plan.full_sink))
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
        return quantize_channels(x, self.quant.k_bits, self.quant.k_meta)

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
        self._key_master.pop(block_id, None)
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

    def copy_slots(self, src: int, dst: int) -> None:
        """Gives block `dst` copies of block `src`'s tail and sink slab rows (a private copy of the block)."""
        if self.quant is None or not self.quant.k_channel:
            return
        for slots, slabs, take, drop in ((self._slot, "tail_k", self._take_slot, self.drop_tail),
                                         (self._sink_slot, "sink_k", self._take_sink, self._drop_sink)):
            drop(dst)
            if src in slots:
                slots[dst] = take()  # may grow (replace) the slab arrays: read them after
                for a in getattr(self, slabs):
                    a[slots[dst]] = a[slots[src]]
        if src in self._key_master:
            self._key_master[dst] = list(self._key_master[src])
        self._slot_map = None

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
