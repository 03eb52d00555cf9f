"""Fixed pool of KV blocks with reference counts and a hash -> block map for prefix caching.

Pure bookkeeping: a block is an id into the KV tensors that live elsewhere. Freed blocks keep
their hash and contents until reused, so a later request with the same prefix can revive them
(`get_cached_block` + `touch`); reuse of such a block is an eviction.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .free_queue import FreeBlockQueue


@dataclass(slots=True, eq=False)  # identity equality: two blocks are never "the same" by value
class Block:
    """One KV block (its K/V live in the KVPool under the same id)."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    token_ids: tuple = ()
    # repr=False: printing a linked neighbour would recurse through the whole queue.
    prev_free: object = field(default=None, repr=False)
    next_free: object = field(default=None, repr=False)
    last_used: float = 0.0


class BlockPool:
    """Owns every block; hands them out by reference count."""

    def __init__(self, num_blocks: int, on_evict=None) -> None:
        """Creates all blocks up front.

        Args:
            num_blocks: Pool size; block ids are 0..num_blocks-1 and never change.
            on_evict: called with a cached block just before its contents are dropped (the SSD tier spills it).
        """
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Id order so a fresh pool hands out 0, 1, 2, ... (deterministic tests and layouts).
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, Block] = {}
        # Cached blocks nobody references, least recently used first (what TTL and the size cap trim).
        self.lru: OrderedDict[int, Block] = OrderedDict()
        self.evictions = 0
        self.on_evict = on_evict

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    @property
    def num_cached_free_blocks(self) -> int:
        """Cached blocks with no reference (reusable by a prefix hit, or evictable)."""
        return len(self.lru)

    def get_new_blocks(self, n: int) -> list[Block]:
        """Takes `n` blocks from the front of the free queue, evicting any cached contents.

        Args:
            n: Number of blocks wanted.

        Returns:
            The blocks, each with ref_count 1, in the order they were taken.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self.free_queue):
            raise ValueError(
                f"need {n} free KV blocks but only {len(self.free_queue)} of {self.num_blocks} are free"
            )
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                self._evict(block)
            block.ref_count = 1
            out.append(block)
        return out

    def _evict(self, block: Block) -> None:
        if self.on_evict is not None:
            self.on_evict(block)
        if self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
        self.lru.pop(block.block_id, None)
        block.block_hash = None
        block.token_ids = ()
        self.evictions += 1

    def free_blocks(self, blocks: Iterable[Block]) -> None:
        """Drops one reference from each block and queues those reaching 0 for reuse.

        Blocks without cached contents go to the front, reversed (a sequence's table passed reversed comes back
        in table order, so the next sequence gets the same contiguous run); cached blocks go to the back in the
        order given (LRU), so a prefix stays findable as long as possible and its tail blocks are evicted first.

        Args:
            blocks: Blocks in the order they should become reusable; pass a sequence's table
                reversed so its tail blocks (least likely to be shared prefixes) go first.
        """
        now = time.monotonic()
        uncached = []
        for block in blocks:
            if block.ref_count <= 0:
                raise ValueError(f"block {block.block_id} freed more often than allocated")
            block.ref_count -= 1
            if block.ref_count == 0:
                block.last_used = now
                if block.block_hash is None:
                    uncached.append(block)
                else:
                    self.free_queue.append(block)
                    self.lru[block.block_id] = block
        for block in uncached:
            self.free_queue.appendleft(block)

    def touch(self, blocks: Iterable[Block]) -> None:
        """Takes a reference on blocks found in the cache, reviving them if they were free.

        Args:
            blocks: Cached blocks being reused by another sequence.
        """
        for block in blocks:
            if block.ref_count == 0:
                self.free_queue.remove(block)
                self.lru.pop(block.block_id, None)
            block.ref_count += 1

    def cache_full_block(self, block: Block, block_hash: bytes, token_ids: Sequence[int]) -> bool:
        """Registers a full block's contents so later prefixes can find it.

        Args:
            block: A block whose KV slots are all written.
            block_hash: Hash of the block's tokens chained with its prefix's hash.
            token_ids: The block's tokens, kept to reject hash collisions.

        Returns:
            True if registered; False if another block already holds this hash (first wins).
        """
        if block.block_hash is not None:
            if block.block_hash == block_hash:
                return self.cached.get(block_hash) is block
            raise ValueError(f"block {block.block_id} is already cached under another hash")
        if block_hash in self.cached:
            return False
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self.cached[block_hash] = block
        return True

    def get_cached_block(self, block_hash: bytes, token_ids: Sequence[int]) -> Block | None:
        """Looks up a cached block; does not take a reference (call `touch`).

        Args:
            block_hash: Hash to look up.
            token_ids: The tokens the caller expects the block to hold.

        Returns:
            The block if the hash matches and its stored tokens are equal, else None.
        """
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def drop_cached(self, block: Block, spill: bool = True) -> None:
        """Forgets an unreferenced block's cached contents (TTL, size cap, clear); it becomes reused first.

        Args:
            spill: let `on_evict` copy it to a lower tier first (eviction); False when the user clears the cache.
        """
        if block.block_hash is None or block.ref_count != 0:
            return
        hook = self.on_evict
        if not spill:
            self.on_evict = None
        try:
            self._evict(block)
        finally:
            self.on_evict = hook
        self.free_queue.remove(block)
        self.free_queue.appendleft(block)

    def evict_expired(self, now: float, ttl: float) -> int:
        """Drops cached free blocks unused for more than `ttl` seconds; returns how many."""
        n = 0
        while self.lru:
            block = next(iter(self.lru.values()))
            if now - block.last_used <= ttl:
                break
            self.drop_cached(block)
            n += 1
        return n

    def enforce_cap(self, max_blocks: int) -> int:
        """Drops the least recently used cached free blocks beyond `max_blocks`; returns how many."""
        n = 0
        while len(self.lru) > max_blocks:
            self.drop_cached(next(iter(self.lru.values())))
            n += 1
        return n

    def clear_cached(self) -> int:
        """Drops every unreferenced cached block (pinned blocks hold a reference and stay)."""
        n = len(self.lru)
        for block in list(self.lru.values()):
            self.drop_cached(block, spill=False)
        return n
