"""Per-sequence block tables over a `BlockPool` (nano-vllm style paired can_X / X verbs).

A sequence is any object with `seq_id`, `num_tokens` (tokens; `num_slots`, if present, is how many of them
need KV slots now: a sequence under a long-context policy holds fewer) and
`block_table` (list of block ids, written only here). For prefix caching it also has `all_ids`,
`hash_key` (a `HashKey`, or None to opt out), `block_hashes` (hashes of its full blocks computed so far)
and `num_registered` (full blocks already published to the cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from .block_pool import Block, BlockPool


class LowerTier(Protocol):
    """A slower store below the pool (the SSD tier) that the block manager consults on a miss."""

    def contains(self, block_hash: bytes) -> bool: ...

    def load(self, block_hash: bytes, token_ids, block_id: int) -> bool:
        """Stages the stored K/V of `block_hash` for `block_id`; False when it is gone."""

    def spill(self, block: Block) -> None:
        """Copies a cached block down before its contents are dropped from the pool."""


@dataclass(slots=True, frozen=True)
class BlockStats:
    """Pool occupancy: blocks by state, and how many cached contents were dropped so far."""

    total: int
    used: int
    free: int
    cached_free: int  # free blocks that still hold cached contents (revivable by a prefix hit)
    cached: int  # blocks registered in the prefix cache, referenced or not
    evictions: int


class BlockManager:
    """Maps sequences to KV blocks of `block_size` token slots each."""

    def __init__(self, num_blocks: int, block_size: int, lower_tier: LowerTier | None = None) -> None:
        """Creates the pool.

        Args:
            num_blocks: Total KV blocks available.
            block_size: Token slots per block.
            lower_tier: where cached blocks spill before reuse and misses are looked up (None: memory only).
        """
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, on_evict=None if lower_tier is None else lower_tier.spill)
        self.lower_tier = lower_tier
        # Conditions a prefix hit must also meet besides cached blocks (e.g. a state snapshot at its end, a
        # sliding-window group's blocks): each maps (seq, n matched blocks) -> the largest usable n' <= n.
        self.hit_limits: list = []

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks required to hold `num_tokens` slots.

        Args:
            num_tokens: Token count (>= 0).

        Returns:
            ceil(num_tokens / block_size).
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def _missing(self, seq, num_tokens: int) -> int:
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table))

    def _hash_upto(self, seq, n_blocks: int) -> list[bytes]:
        # Hashes of the first n_blocks full blocks, computed once per sequence and extended as it grows.
        bs, hashes, ids = self.block_size, seq.block_hashes, seq.all_ids
        for i in range(len(hashes), n_blocks):
            parent = hashes[i - 1] if i else None
            hashes.append(seq.hash_key.block_hash(parent, i, ids[i * bs:(i + 1) * bs], bs))
        return hashes[:n_blocks]

    def _n_matchable(self, seq) -> int:
        # Full blocks a lookup may match: never the one holding the last token, and no more than the sequence
        # allows (`max_hit_tokens`, e.g. under a long-context policy).
        n = min(seq.num_tokens - 1, len(seq.all_ids))  # tokens in flight have no ids yet
        cap = getattr(seq, "max_hit_tokens", None)
        return (n if cap is None else min(n, cap)) // self.block_size

    def _secondary_hits(self, seq, start: int) -> int:
        # Number of full blocks after `start` found in the lower tier (contiguous run).
        if self.lower_tier is None or getattr(seq, "hash_key", None) is None:
            return 0
        n_full = self._n_matchable(seq)
        hashes = self._hash_upto(seq, n_full)
        n = 0
        for h in hashes[start:]:
            if not self.lower_tier.contains(h):
                break
            n += 1
        return n

    def match_prefix(self, seq) -> list:
        """Cached blocks holding the longest prefix of the sequence's tokens.

        Only full blocks are matched, and never the block that would hold the last token: its logits are needed,
        so at least one token is always computed.

        Returns:
            The matching Blocks, in order (no references taken).
        """
        if getattr(seq, "hash_key", None) is None:
            return []
        n_full = self._n_matchable(seq)
        hits = []
        bs, ids = self.block_size, seq.all_ids
        for i, h in enumerate(self._hash_upto(seq, n_full)):
            block = self.pool.get_cached_block(h, ids[i * bs:(i + 1) * bs])
            if block is None:
                break
            hits.append(block)
        return hits[: self._usable(seq, len(hits))]

    def cached_block(self, seq, i: int):
        """The memory-cached Block holding the sequence's i-th full block of tokens, or None (no references
        taken). Unlike `match_prefix` this may be the block of the last token (`Engine` copies it)."""
        bs = self.block_size
        if getattr(seq, "hash_key", None) is None or (i + 1) * bs > len(seq.all_ids):
            return None
        return self.pool.get_cached_block(self._hash_upto(seq, i + 1)[i], seq.all_ids[i * bs:(i + 1) * bs])

    def _usable(self, seq, n: int) -> int:
        # The largest k <= n that every hit limit accepts (each limit is monotone: try again until stable).
        k = n
        while self.hit_limits:
            k2 = min(limit(seq, k) for limit in self.hit_limits)
            if k2 == k:
                break
            k = k2
        return k

    def register_full_blocks(self, seq, num_known: int) -> int:
        """Publishes the sequence's full blocks whose K/V are written and whose tokens are known.

        Args:
            num_known: positions [0, num_known) have final token ids and K/V in the pool.
        Returns:
            The number of blocks newly cached.
        """
        if getattr(seq, "hash_key", None) is None:
            return 0
        bs, ids = self.block_size, seq.all_ids
        n_full = min(num_known // bs, len(seq.block_table))
        hashes = self._hash_upto(seq, n_full)
        added = 0
        for i in range(seq.num_registered, n_full):
            block = self.pool.blocks[seq.block_table[i]]
            if block.block_hash is None and self.pool.cache_full_block(block, hashes[i], ids[i * bs:(i + 1) * bs]):
                added += 1
        seq.num_registered = max(seq.num_registered, n_full)
        return added

    def can_allocate(self, seq) -> bool:
        """Whether `allocate(seq)` would succeed now.

        Args:
            seq: A sequence without blocks.

        Returns:
            True if enough free blocks exist for `seq.num_tokens`.
        """
        hits = self.match_prefix(seq)  # lower-tier hits need fresh blocks like misses: no change to the count
        revived = sum(1 for b in hits if b.ref_count == 0)  # taking them removes them from the free queue
        return max(0, self.blocks_needed(_slots(seq)) - len(hits)) + revived <= self.pool.num_free_blocks

    def allocate(self, seq) -> int:
        """Gives a sequence blocks for all of its `num_tokens`, reusing cached prefix blocks.

        Args:
            seq: A sequence with an empty block_table.
        Returns:
            The number of prompt tokens whose K/V came from the prefix cache.
        """
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already holds {len(seq.block_table)} blocks")
        hits = self.match_prefix(seq)
        needed = max(0, self.blocks_needed(_slots(seq)) - len(hits))
        free = self.pool.num_free_blocks - sum(1 for b in hits if b.ref_count == 0)
        if needed > free:
            raise ValueError(
                f"sequence {seq.seq_id} needs {needed} KV blocks for {seq.num_tokens} tokens "
                f"but only {free} are free"
            )
        self.pool.touch(hits)
        seq.block_table.extend(b.block_id for b in hits)
        new = self.pool.get_new_blocks(needed)
        seq.block_table.extend(b.block_id for b in new)
        # Promote what the lower tier has right after the memory hits (in order; stop at the first failure).
        n_hit = len(hits)
        bs = self.block_size
        secondary = self._secondary_hits(seq, n_hit)
        secondary = self._usable(seq, n_hit + secondary) - n_hit if secondary else 0
        for j in range(min(len(new), max(0, secondary))):
            i = n_hit
            block, toks = new[j], seq.all_ids[i * bs:(i + 1) * bs]
            if not self.lower_tier.load(seq.block_hashes[i], toks, block.block_id):
                break
            self.pool.cache_full_block(block, seq.block_hashes[i], toks)
            n_hit += 1
        n_hit = self._usable(seq, n_hit)  # a promotion that stopped early may end where a limit fails
        if hasattr(seq, "num_registered"):
            seq.num_registered = n_hit
        return n_hit * self.block_size

    def can_append(self, seq, n: int = 1) -> bool:
        """Whether `may_append(seq, n)` would succeed now.

        Args:
            seq: An allocated sequence.
            n: Tokens about to be added.

        Returns:
            True if the blocks needed for `seq.num_tokens + n` slots are available.
        """
        return self._missing(seq, _slots(seq) + n) <= self.pool.num_free_blocks

    def may_append(self, seq, n: int = 1) -> None:
        """Ensures slots exist for `seq.num_tokens + n` tokens, adding blocks at boundaries.

        Args:
            seq: An allocated sequence; the caller bumps `num_tokens` after writing.
            n: Tokens about to be added.
        """
        missing = self._missing(seq, _slots(seq) + n)
        free = self.pool.num_free_blocks
        if missing > free:
            raise ValueError(
                f"sequence {seq.seq_id} needs {missing} more KV blocks to append {n} tokens "
                f"but only {free} are free"
            )
        seq.block_table.extend(b.block_id for b in self.pool.get_new_blocks(missing))

    def free(self, seq) -> None:
        """Releases a sequence's blocks and clears its block_table.

        Args:
            seq: The sequence; freeing one without blocks is a no-op.
        """
        # Reverse order puts the tail blocks at the front of reuse, keeping shared prefixes longer.
        self.pool.free_blocks(self.pool.blocks[i] for i in reversed(seq.block_table))
        seq.block_table.clear()

    def stats(self) -> BlockStats:
        """Pool occupancy snapshot."""
        p = self.pool
        return BlockStats(total=p.num_blocks, used=p.num_used_blocks, free=p.num_free_blocks,
                          cached_free=p.num_cached_free_blocks, cached=p.num_cached_blocks, evictions=p.evictions)

    def usage(self) -> dict[str, int]:
        """Pool occupancy snapshot as {blocks_total, blocks_used, blocks_free, blocks_cached}."""
        s = self.stats()
        return {"blocks_total": s.total, "blocks_used": s.used, "blocks_free": s.free, "blocks_cached": s.cached}

    # -- verbs on block ids for the engine's rooms (sessions, prefixes, policies, tiers) -----------------
    def hold(self, block_ids: list[int]) -> None:
        """Takes a reference on blocks (reviving cached free ones): a pin that keeps them resident."""
        self.pool.touch([self.pool.blocks[i] for i in block_ids])

    def release(self, block_ids: list[int]) -> None:
        """Drops one reference from each block, in the order given (see BlockPool.free_blocks)."""
        self.pool.free_blocks([self.pool.blocks[i] for i in block_ids])

    def new_blocks(self, n: int) -> list[int]:
        """Takes `n` free blocks (one reference each); ValueError when fewer are free."""
        return [b.block_id for b in self.pool.get_new_blocks(n)]

    def private_copy(self, block_id: int, copy) -> int:
        """Copy on write: a block other sequences use, or that the prefix cache publishes, is copied first.

        Args:
            copy: copy(src, dst) copies a block's K/V. Returns the id to write (the same one if already private).
        """
        b = self.pool.blocks[block_id]
        if b.ref_count == 1 and b.block_hash is None:
            return block_id
        new = self.pool.get_new_blocks(1)[0]
        copy(block_id, new.block_id)
        self.pool.free_blocks([b])
        return new.block_id

    def publish(self, block_ids: list[int], hash_key, token_ids: list[int]) -> None:
        """Registers full blocks holding `token_ids` (in order, from position 0) in the prefix cache.

        A position the cache already has a block for keeps that block (first wins).
        """
        bs, parent = self.block_size, None
        for i, b in enumerate(block_ids):
            toks = token_ids[i * bs:(i + 1) * bs]
            parent = h = hash_key.block_hash(parent, i, toks, bs)
            if self.pool.get_cached_block(h, toks) is None:
                self.pool.cache_full_block(self.pool.blocks[b], h, toks)

    def trim_cache(self, ttl: float | None, cap_blocks: int | None) -> None:
        """Drops cached free blocks idle longer than `ttl` seconds and beyond `cap_blocks` (None: no limit)."""
        if ttl is not None:
            self.pool.evict_expired(time.monotonic(), ttl)
        if cap_blocks is not None:
            self.pool.enforce_cap(cap_blocks)

    def clear_cached(self, block_ids: list[int] | None = None) -> int:
        """Forgets cached free blocks without spilling them (all, or those of `block_ids`); returns how many."""
        if block_ids is None:
            return self.pool.clear_cached()
        n = 0
        for i in block_ids:
            b = self.pool.blocks[i]
            if b.ref_count == 0 and b.block_hash is not None:
                self.pool.drop_cached(b, spill=False)
                n += 1
        return n

    def cached_blocks(self) -> list[Block]:
        """Every block holding cached contents (referenced or not), by id."""
        return [b for b in self.pool.blocks if b.block_hash is not None]

    def block_states(self, pinned: set[int]) -> list[str]:
        """State of every block: pinned (ids given), shared (several references), used, cached, free."""
        out = []
        for b in self.pool.blocks:
            if b.block_id in pinned:
                out.append("pinned")
            elif b.ref_count > 1:
                out.append("shared")
            elif b.ref_count == 1:
                out.append("used")
            elif b.block_hash is not None:
                out.append("cached")
            else:
                out.append("free")
        return out


def _slots(seq) -> int:
    return getattr(seq, "num_slots", seq.num_tokens)
