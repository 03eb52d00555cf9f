"""Block export/import across layer groups: the full-attention pool plus each sliding window's pool of window blocks
(engine/window_groups.py), for session files and the SSD tier.

Exported per layer as `KVPool.export_blocks` gives them, in the model's paged slot order (`make_cache()` order,
as before layers were grouped, so files do not depend on the grouping). A block carries window rows only while its
window block is mapped (the last blocks of a conversation); for the other blocks the window layers' entries are all
zero bytes, which import reads as "no window rows": the block keeps no window block, and a prefix hit never relies
on it (`WindowBlocks.hit_limit`). Reading real rows that happen to be all zero as absent only costs a recompute,
never a wrong result.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..storage.kv_pool import KVPool
from .window_groups import WindowGroups


class GroupedBlockBytes:
    """The export/import verbs of `KVPool` (`BlockBytes`) over every paged layer group.

    Args:
        pool: the full-attention layers' pool (logical block ids). windows: the window groups.
        slots: the paged slots in the model's order as (window or None, index in that group's pool).
    """

    def __init__(self, pool: KVPool, windows: WindowGroups, slots: list[tuple]):
        self.pool, self.windows = pool, windows
        self.order = sorted(windows.pools)
        self.n_layers = pool.n_layers + sum(windows.pools[w].n_layers for w in self.order)
        # grouped position (full layers, then each window's) of each slot in model order
        start = {None: 0}
        for w in self.order:
            start[w] = self.n_layers - sum(windows.pools[x].n_layers for x in self.order if x >= w)
        self.perm = [start[w] + i for w, i in slots]
        assert sorted(self.perm) == list(range(self.n_layers))
        for name in ("block_size", "n_kv_heads", "head_dim", "dtype", "quant", "num_blocks", "format_name",
                     "sink_section_bytes"):
            setattr(self, name, getattr(pool, name))

    @property
    def k(self) -> list:
        return self.pool.k + [a for w in self.order for a in self.windows.pools[w].k]

    @property
    def v(self) -> list:
        return self.pool.v + [a for w in self.order for a in self.windows.pools[w].v]

    def block_layout(self):
        """As `KVPool.block_layout` (every group stores the same format)."""
        return self.pool.block_layout()

    def export_blocks(self, block_ids: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per layer (model order) K and V numpy arrays, block axis first; zero bytes for blocks without window
        rows."""
        ks, vs = self._export_grouped(block_ids)
        return [ks[i] for i in self.perm], [vs[i] for i in self.perm]

    def _export_grouped(self, block_ids: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        ks, vs = self.pool.export_blocks(block_ids)
        for w in self.order:
            wpool, wmap = self.windows.pools[w], self.windows.maps[w]
            rows = [(i, wmap.of[b]) for i, b in enumerate(block_ids) if wmap.has_rows(b)]
            wks, wvs = wpool.export_blocks([wid for _, wid in rows]) if rows else ([], [])
            at = [i for i, _ in rows]
            for layer in range(wpool.n_layers):
                for got, out, ref in ((wks, ks, ks[0] if ks else None), (wvs, vs, vs[0] if vs else None)):
                    shape, dtype = (got[layer].shape[1:], got[layer].dtype) if rows else (ref.shape[1:], ref.dtype)
                    full = np.zeros((len(block_ids), *shape), dtype=dtype)
                    if rows:
                        full[at] = got[layer]
                    out.append(full)
        return ks, vs

    def premap(self, block_id: int, k: np.ndarray) -> None:
        """Maps window blocks for a block about to be imported (an SSD promotion: its rows are written when the
        staged blocks are flushed, but a prefix hit is checked right away). k: per layer, this block's K."""
        k = self._grouped(k)
        at = self.pool.n_layers
        for w in self.order:
            n = self.windows.pools[w].n_layers
            if np.any(k[at]):
                self.windows.maps[w].adopt(block_id)
            at += n

    def import_blocks(self, block_ids: list[int], ks: list[np.ndarray], vs: list[np.ndarray]) -> None:
        """Writes blocks exported by `export_blocks` (same format and plan) into the given logical block ids."""
        ks, vs = self._grouped(ks), self._grouped(vs)
        n_full = self.pool.n_layers
        self.pool.import_blocks(block_ids, ks[:n_full], vs[:n_full])
        at = n_full
        for w in self.order:
            wpool, wmap = self.windows.pools[w], self.windows.maps[w]
            wk, wv = ks[at:at + wpool.n_layers], vs[at:at + wpool.n_layers]
            at += wpool.n_layers
            present = [i for i in range(len(block_ids)) if np.any(wk[0][i]) or np.any(wv[0][i])]
            if not present:
                continue
            wids = [wmap.adopt(block_ids[i]) for i in present]
            wpool.import_blocks(wids, [a[present] for a in wk], [a[present] for a in wv])
        mx.eval(self.k, self.v)

    def _grouped(self, per_layer) -> list:
        # model order -> grouped order
        out = [None] * self.n_layers
        for model_i, grouped_i in enumerate(self.perm):
            out[grouped_i] = per_layer[model_i]
        return out
