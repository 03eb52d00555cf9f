"""The SSD tier of a distributed run: one SSD store per rank, each holding that rank's KV heads of a block,
under that machine's own cache directory (`--ssd-dir`, or ZKV_CACHE_DIR's `kv-blocks`).

Rank 0 decides everything (which block spills, which hash is promoted into which block id) as it does in one
process (engine/tiers.py); every decision reaches the other ranks as a plan message (plan.py: SSD_OPEN, SPILL,
PROMOTE, FLUSH), and each rank then does the same with its own pool and its own files. A promotion succeeds only
when every rank read its file (one gather of a flag per block): a rank whose file is missing, torn or corrupt
makes every rank forget that hash and rank 0 recompute the block, so a rank never mixes heads of different
contents.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..engine.tiers import TierStore, open_ssd
from ..errors import DistributedError
from ..storage.ssd_store import SSDStore
from . import plan as P
from .group import DistGroup


def open_rank_ssd(tiers_cfg, pool, fingerprint: str, group: DistGroup, split: str = "tensor") -> SSDStore:
    """This rank's SSD store: its own directory per (model, KV format, rank, world size), so two ranks that share
    a cache directory (two local ranks) never read each other's heads.

    Args:
        tiers_cfg: this rank's `TiersConfig` (its own `--ssd-dir` / size). pool: this rank's `KVPool` (its heads).
        fingerprint: the model's fingerprint. group: the job's group. split: "tensor" (this rank's heads of every
            layer) or "pipeline" (every head of this rank's layers).
    Raises:
        ConfigError: the directory cannot be used (names it and the flag that changes it).
    """
    return open_ssd(tiers_cfg, pool, f"{fingerprint}|rank {group.rank} of {group.size}|{split}")


class RankTier:
    """One rank's side of the SSD tier: its store, its pool (its heads only) and its promoted blocks not yet
    written into the pool. The same verbs run on every rank, in the order rank 0's plan gives them.

    Args:
        ssd: this rank's store. pool: this rank's `KVPool`. group: the job's group.
    """

    def __init__(self, ssd: SSDStore, pool, group: DistGroup):
        self.ssd, self.pool, self.group = ssd, pool, group
        self.staged: list[tuple[int, np.ndarray, np.ndarray]] = []  # (block id, K, V), [L, h, BS, D] each

    def spill(self, block_id: int, h: bytes, tokens: list[int]) -> None:
        """Queues this rank's heads of `block_id` for writing under hash `h`."""
        self.flush()  # a promoted block may be spilled again before the next forward wrote it
        ks, vs = self.pool.export_blocks([block_id])
        self.ssd.put(h, tokens, np.stack([k[0] for k in ks]), np.stack([v[0] for v in vs]))

    def promote(self, block_id: int, h: bytes, tokens: list[int]) -> bool:
        """Reads `h` from this rank's store and stages it for `block_id` if every rank could read its file.

        Returns:
            True when every rank staged the block; False (nothing staged anywhere, `h` forgotten on every rank so
            the block is recomputed and spilled again) when any rank's file was missing or corrupt.
        """
        self.ssd.flush()  # a write still queued on one rank must not make that rank alone miss
        got = self.ssd.get(h, tokens)
        flags = self.group.gather(mx.array([int(got is not None)], dtype=mx.int32), "an SSD promotion")
        if all(int(f) for f in np.array(flags).reshape(-1)):
            self.staged.append((block_id, got[0], got[1]))
            return True
        if got is not None:
            self.ssd.promotions -= 1  # counted by get(), undone: the block is recomputed
        self.ssd.discard(h)
        return False

    def flush(self) -> None:
        """Writes the staged blocks into this rank's pool (before a forward, an export or a spill reads it)."""
        if not self.staged:
            return
        staged, self.staged = self.staged, []
        L = self.pool.n_layers
        self.pool.import_blocks([b for b, _, _ in staged],
                                [np.stack([k[i] for _, k, _ in staged]) for i in range(L)],
                                [np.stack([v[i] for _, _, v in staged]) for i in range(L)])


class LeaderTiers(TierStore):
    """Rank 0's `TierStore` (the block manager's `LowerTier` and the engine's verbs) for a distributed run: each
    verb first sends its plan, then does rank 0's share through its own `RankTier`. Exports for sessions gather
    every rank's heads (`ShardedPool`), as without an SSD tier.

    Args:
        leader: rank 0's `LeaderRunner`. ssd: rank 0's store (None: memory only, nothing is sent).
    """

    def __init__(self, leader, ssd: SSDStore | None):
        super().__init__(leader.pool, ssd)
        self.leader = leader
        self.rank = None if ssd is None else RankTier(ssd, leader.inner.pool, leader.group)

    def load(self, h: bytes, token_ids, block_id: int) -> bool:
        tokens = list(token_ids)
        self.leader.send(P.encode_block(P.PROMOTE, block_id, h, tokens))
        return self.rank.promote(block_id, h, tokens)

    def spill(self, block) -> None:
        if self.ssd is None or block.block_hash is None or self.ssd.contains(block.block_hash):
            return
        tokens = list(block.token_ids)
        self.leader.send(P.encode_block(P.SPILL, block.block_id, block.block_hash, tokens))
        self.rank.spill(block.block_id, block.block_hash, tokens)

    def flush_staged(self) -> None:
        if self.rank is None or not self.rank.staged:
            return
        self.leader.send([P.FLUSH])
        self.rank.flush()

    def close(self, cached_blocks) -> None:
        """Spills `cached_blocks` not yet on SSD on every rank (the other ranks close their stores on CLOSE).
        After a lost rank no spill is sent (each is a collective the dead rank cannot answer): rank 0 only
        finishes its own queued writes."""
        if self.ssd is None:
            return
        group = self.leader.group
        try:
            for b in cached_blocks:
                if group.failed is not None:
                    break
                self.spill(b)
        except DistributedError:
            pass  # the rank was lost during these spills: reported once by whoever waits on the job
        self.ssd.close()
