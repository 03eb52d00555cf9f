"""The runner's sliding-window layer groups: window-sized KV memory (issue #16 item 3, design.md §9).

A model's full-attention slots keep the main pool, addressed by the logical block tables. The slots of each
sliding window W get their own smaller `KVPool` of window blocks and a `WindowBlocks` map (cache/window_blocks.py):
each step translates the sequences' logical tables into window tables and builds the group's own write plan and
attention metadata, which `models/paged.build_caches` hands to the group's slots. Slot indices are renumbered per
pool (`split_plan`). A model whose paged slots are all windowed keeps one pool (nothing to split against).
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx

from ..cache.window_blocks import WindowBlocks
from ..models.attention import DecodeMetadata, decode_path, prefill_metadata
from ..models.layer_plan import LayerPlan
from ..storage.kv_pool import KVPool


def window_counts(plan: LayerPlan) -> dict[int, int]:
    """Paged window slots per window W, or {} when the plan keeps one pool (no window or no full slot)."""
    paged = plan.paged_slots
    if not any(s.window is None for s in paged):
        return {}
    out: dict[int, int] = {}
    for s in paged:
        if s.window is not None:
            out[s.window] = out.get(s.window, 0) + 1
    return out


def blocks_per_sequence(window: int, block_size: int, chunk: int) -> int:
    """Window blocks one sequence holds at most: a prefill chunk of `chunk` rows plus the W - 1 before it, over
    block boundaries."""
    return -(-(window - 1 + chunk) // block_size) + 1


def split_plan(plan: LayerPlan) -> LayerPlan:
    """A copy of the plan whose paged slots are numbered per pool: full slots 0.. in the main pool, each
    window's slots 0.. in that window's pool."""
    counters: dict = {}

    def renumber(t):
        kind, x = t
        if kind == "list":
            return ("list", [renumber(c) for c in x])
        if kind == "kv" and x.paged:
            i = counters.get(x.window, 0)
            counters[x.window] = i + 1
            return ("kv", dataclasses.replace(x, index=i))
        return t

    template = [renumber(t) for t in plan.template]
    slots: list = []

    def collect(t):
        kind, x = t
        if kind == "list":
            for c in x:
                collect(c)
        elif kind == "kv":
            slots.append(x)

    for t in template:
        collect(t)
    return dataclasses.replace(plan, template=template, slots=slots)


class WindowGroups:
    """Per window W: its pool of window blocks and its logical -> window block map.

    Args:
        counts: paged slots per window (`window_counts`); blocks: window blocks per window.
        block_size, n_kv_heads, head_dim, dtype, quant: the main pool's format (window pools store the same).
    """

    def __init__(self, counts: dict[int, int], blocks: dict[int, int], block_size: int, n_kv_heads: int,
                 head_dim: int, dtype: mx.Dtype, quant=None):
        self.pools: dict[int, KVPool] = {}
        self.maps: dict[int, WindowBlocks] = {}
        # distributed runs (zkv_mlx/distributed/): tables chosen beforehand (rank 0) or by rank 0 (ranks > 0),
        # one entry per call, used in call order instead of the maps' choice
        self.replay: list | None = None
        for w, n_slots in counts.items():
            pool = KVPool(n_slots, blocks[w], n_kv_heads, block_size, head_dim, dtype, quant)
            self.pools[w] = pool
            self.maps[w] = WindowBlocks(blocks[w], block_size, w, on_free=pool.drop_tail if pool.tail_k else None)

    def bind(self, block_manager) -> None:
        """Lets the maps see the logical blocks' cached hashes and caps prefix hits to mapped window blocks."""
        for m in self.maps.values():
            m.hash_of = lambda lid: block_manager.pool.blocks[lid].block_hash
            block_manager.hit_limits.append(m.hit_limit(block_manager))

    def _tables(self, acquire) -> dict[int, list[list[int]]]:
        tables = {}
        for w, m in self.maps.items():
            m.reconcile()
            tables[w] = acquire(m)
        return tables

    def prefill_tables(self, seq, start: int, end: int) -> dict[int, list[list[int]]]:
        """Per window W: the one-sequence window block table of a prefill chunk (maps its blocks)."""
        return self._tables(lambda m: [m.acquire(seq, start, end - 1)])

    def decode_tables(self, seqs, positions: list[int]) -> dict[int, list[list[int]]]:
        """Per window W: each sequence's window block table for one decode step (maps its blocks)."""
        return self._tables(lambda m: [m.acquire(s, p, p) for s, p in zip(seqs, positions)])

    def prefill_metas(self, seq, start: int, end: int, context_len: int) -> dict:
        """Each window group's metadata of one prefill chunk (positions [start, end), no drops)."""
        out = {}
        chosen = self.replay.pop(0) if self.replay else self.prefill_tables(seq, start, end)
        for w, (table,) in chosen.items():
            plan = self._write_plan(w, [table], [range(start, end)])
            out[w] = prefill_metadata(self.pools[w], start, plan, [max(b, 0) for b in table], context_len, False)
        return out

    def decode_metas(self, seqs, positions: list[int], positions_arr: mx.array, context_lens: list[int]) -> dict:
        """Each window group's metadata of one decode step (one new row per sequence)."""
        out = {}
        chosen = self.replay.pop(0) if self.replay else self.decode_tables(seqs, positions)
        for w, tables in chosen.items():
            plan = self._write_plan(w, tables, [[p] for p in positions])
            tables = [[max(b, 0) for b in t] for t in tables]
            pool = self.pools[w]
            out[w] = DecodeMetadata(pool, positions_arr, plan, decode_path(pool), tables, context_lens)
        return out

    def _write_plan(self, w: int, tables: list[list[int]], positions: list) -> object:
        bs = self.pools[w].block_size
        blocks = [t[p // bs] for t, ps in zip(tables, positions) for p in ps]
        offsets = [p % bs for ps in positions for p in ps]
        return self.pools[w].plan_write(blocks, offsets, [p for ps in positions for p in ps])

    # -- statistics -------------------------------------------------------------------------------------
    def group_stats(self) -> list[dict]:
        """Per window group: window, slots, bytes per block, blocks total / held / retained, bytes."""
        out = []
        for w, pool in self.pools.items():
            m = self.maps[w]
            m.reconcile()  # finished sequences give their blocks back before they are counted
            m.prune()
            per = pool.total_bytes // max(1, pool.num_blocks)
            out.append({"kind": "window", "window": w, "slots": pool.n_layers, "bytes_per_block": per,
                        "blocks_total": pool.num_blocks, "blocks_used": m.num_held, "blocks_cached": m.num_retained,
                        "blocks_released": m.released, "total_size": pool.total_bytes,
                        "used_size": m.num_held * per, "cached_size": m.num_retained * per})
        return out
