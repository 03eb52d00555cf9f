"""Recurrent-state snapshots of hybrid models at block boundaries, so the prefix cache can serve them too.

A hybrid model (SSM / linear-attention layers beside attention ones: qwen3_next, lfm2, falcon_h1, ...) carries per
sequence a state that summarises every token so far; blocks alone cannot resume it. The same holds for attention
layers kept unpaged (MLA's compressed K/V): their snapshot is the K/V up to the boundary. After computing through a
block boundary k * block_size (a prefill chunk ending there, or a decode step crossing it) the engine keeps a copy
of the state; once block k - 1's tokens are known it is stored under that block's chained hash (which covers every
earlier token and the user's isolation salt). A prefix hit then stops at the last boundary with a snapshot
(`limit`, one of `BlockManager.hit_limits`) and resumes from that state, so a second turn or a shared prefix is
not recomputed -- not only when the whole cached prompt is a prefix, as mlx-lm's prompt cache requires.
Snapshots are evictable like cached blocks: least recently used first, under a byte cap.
"""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx


def _arrays(states: list) -> list[list]:
    """Copies of the arrays of each per-sequence cache: an ArraysCache's `.cache` (SSM / linear-attention state),
    an unpaged KVCache's keys and values up to its offset (`state`). Models replace state arrays, but a copy also
    guards against in-place updates."""
    return [[None if a is None else mx.array(a) for a in _parts(c)] for c in states]


def _parts(c) -> list:
    from mlx_lm.models.cache import ArraysCache

    if isinstance(c, ArraysCache):
        return list(c.cache)
    return [] if c.keys is None else [c.keys[..., : c.offset, :], c.values[..., : c.offset, :]]


def _fill(c, arrays: list) -> None:
    from mlx_lm.models.cache import ArraysCache

    arrays = [None if a is None else mx.array(a) for a in arrays]
    if isinstance(c, ArraysCache):
        c.cache = arrays
    elif arrays:  # KVCache
        c.keys, c.values = arrays
        c.offset = c.keys.shape[2]


def state_bytes(arrays: list[list]) -> int:
    return sum(a.nbytes for arrs in arrays for a in arrs if a is not None)


class StateSnapshots:
    """Snapshots keyed by block hash, least recently used first.

    Args:
        max_bytes: cap on the bytes held (older snapshots are dropped first).
        block_size: tokens per block.
    """

    def __init__(self, max_bytes: int, block_size: int):
        self.max_bytes = max_bytes
        self.block_size = block_size
        self._store: OrderedDict[bytes, list[list]] = OrderedDict()
        self.nbytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._store)

    def capture(self, seq) -> None:
        """Keeps the sequence's state if it has just been computed through a block boundary."""
        n = seq.num_computed
        if n and n % self.block_size == 0 and seq.state is not None and not seq.dropped:
            seq.snapshots_pending[n // self.block_size] = _arrays(seq.state)

    def publish(self, seq) -> None:
        """Stores the pending snapshots whose block hashes are known (after the blocks were registered)."""
        hashes = seq.block_hashes
        for k in [k for k in seq.snapshots_pending if k <= len(hashes)]:
            self.put(hashes[k - 1], seq.snapshots_pending.pop(k))

    def put(self, block_hash: bytes, arrays: list[list]) -> None:
        if block_hash in self._store:
            self._store.move_to_end(block_hash)
            return
        self._store[block_hash] = arrays
        self.nbytes += state_bytes(arrays)
        while self.nbytes > self.max_bytes and len(self._store) > 1:
            _, old = self._store.popitem(last=False)
            self.nbytes -= state_bytes(old)
            self.evictions += 1

    def get(self, block_hash: bytes) -> list[list] | None:
        arrays = self._store.get(block_hash)
        if arrays is not None:
            self._store.move_to_end(block_hash)
        return arrays

    def limit(self, seq, n: int) -> int:
        """The largest k <= n whose boundary has a snapshot (0: none); the block manager's hit limit."""
        hashes = seq.block_hashes
        for k in range(min(n, len(hashes)), 0, -1):
            if hashes[k - 1] in self._store:
                return k
        return 0

    def restore(self, seq, fresh: list) -> list:
        """The state at the sequence's first uncomputed token (a prefix hit's end), in `fresh` caches.

        Args:
            fresh: new state caches of the model (`models.paged.new_states`), filled in place.
        Raises:
            KeyError: no snapshot for that boundary (the hit limit makes this an internal error).
        """
        k = seq.num_computed // self.block_size
        arrays = self._store[seq.block_hashes[k - 1]]
        self._store.move_to_end(seq.block_hashes[k - 1])
        for c, arrs in zip(fresh, arrays):
            _fill(c, arrs)
        return fresh
