"""The tier store: the SSD tier below the KV pool (design.md §7). Cached blocks spill to SSD before their
contents are dropped; a prefix miss that SSD has is promoted: its K/V are staged and written into the pool
before the next forward. The block manager reaches this room through the `LowerTier` verbs it is given."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

from .. import paths
from ..errors import ConfigError
from ..storage.kv_pool import KVPool
from ..storage.ssd_store import SSDStore


def open_ssd(tiers_cfg, kv: KVPool, fingerprint: str) -> SSDStore:
    """The SSD store for this model and KV format (`tiers_cfg`: the `TiersConfig`, with `ssd` on)."""
    t = tiers_cfg
    base = Path(t.dir) if t.dir else paths.cache_dir() / "kv-blocks"
    fmt = hashlib.sha256(f"{fingerprint}|{kv.format_name}".encode()).hexdigest()[:16]
    if t.size == "auto":
        try:
            base.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(base).free
        except OSError:
            free = 0
        size = min(max(free // 10, 256 << 20), 64 << 30)
    else:
        size = t.size
    try:
        (ks, kd), (vs, vd) = kv.block_layout()
        return SSDStore(base / fmt, size, layout=(((kv.n_layers, *ks), kd), ((kv.n_layers, *vs), vd)))
    except OSError as e:
        raise ConfigError(f"cannot use the SSD cache directory {base}: {e}; pass --ssd-dir or --ssd-cache off")


class TierStore:
    """Moves block K/V between the KV pool and the SSD store (None: memory only; staging still applies).

    Args:
        kv: the KV arrays. ssd: the SSD store, or None.
    """

    def __init__(self, kv: KVPool, ssd: SSDStore | None):
        self.kv = kv
        self.ssd = ssd
        self._staged: list[tuple[int, object, object]] = []  # (block id, K, V) promoted, not yet in the pool

    # -- the LowerTier verbs (cache/block_manager.py) --------------------------------------------------
    def contains(self, h: bytes) -> bool:
        return self.ssd is not None and self.ssd.contains(h)

    def load(self, h: bytes, token_ids, block_id: int) -> bool:
        """Promotes a block from SSD: its K/V are staged and written into the pool before the next forward."""
        got = self.ssd.get(h, token_ids)
        if got is None:
            return False
        if hasattr(self.kv, "premap"):  # window groups map their blocks now (engine/window_bytes.py)
            self.kv.premap(block_id, got[0])
        self._staged.append((block_id, got[0], got[1]))
        return True

    def spill(self, block) -> None:
        """A cached block is about to be reused: copies it to the SSD tier first (once)."""
        if self.ssd is None or block.block_hash is None or self.ssd.contains(block.block_hash):
            return
        ks, vs = self.export([block.block_id])
        self.ssd.put(block.block_hash, block.token_ids, np.stack([k[0] for k in ks]), np.stack([v[0] for v in vs]))

    # -- the engine's verbs ----------------------------------------------------------------------------
    def flush_staged(self) -> None:
        """Writes promoted blocks into the pool (before a forward or an export reads them)."""
        if not self._staged:
            return
        staged, self._staged = self._staged, []
        kv = self.kv
        kv.import_blocks([b for b, _, _ in staged],
                         [np.stack([k[layer] for _, k, _ in staged]) for layer in range(kv.n_layers)],
                         [np.stack([v[layer] for _, _, v in staged]) for layer in range(kv.n_layers)])

    def export(self, block_ids: list[int]) -> tuple[list, list]:
        """Copies the stored bytes of blocks out of the pool: per layer numpy arrays, block axis first."""
        self.flush_staged()
        return self.kv.export_blocks(block_ids)

    def close(self, cached_blocks) -> None:
        """Spills `cached_blocks` not yet on SSD (so the next process finds them) and stops the writer."""
        if self.ssd is None:
            return
        for b in cached_blocks:
            self.spill(b)
        self.ssd.close()
