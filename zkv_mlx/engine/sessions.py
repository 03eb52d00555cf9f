"""Resident sessions: a session pins (holds a reference on) the blocks of its conversation so they stay in
memory; under block pressure the least recently used session is released (its blocks stay cached and spill
to SSD as they are reused). Also the import of a saved sequence's blocks into the pool."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..cache import BlockManager
from ..errors import OutOfKVMemory
from ..storage.kv_pool import KVPool
from .sequence import SamplingParams, Sequence


class ResidentSessions:
    """Session pins over the block manager.

    Args:
        blocks: the block manager. kv: the KV arrays (imports write into them). hash_key: hash_key(user, ids)
        gives a request's HashKey (the prefix cache's), or None when prefix caching is off.
    """

    def __init__(self, blocks: BlockManager, kv: KVPool, hash_key):
        self.blocks = blocks
        self.kv = kv
        self.hash_key = hash_key
        self.pins: dict = {}  # (user, name) -> pinned block ids, least recently used first
        self.released = 0  # sessions released under pressure

    def full_blocks(self, user: str, token_ids: list[int]) -> list[int]:
        """Block ids holding the K/V of the full blocks of `token_ids` (as cached for `user`), in order."""
        probe = Sequence(prompt_ids=list(token_ids) + [0], params=SamplingParams(), user=user)
        probe.hash_key = self.hash_key(user, token_ids)
        if probe.hash_key is None:
            return []
        return [b.block_id for b in self.blocks.match_prefix(probe)]

    def set_pins(self, key, block_ids: list[int]) -> None:
        """Makes `block_ids` the resident blocks of session `key` (most recently used now)."""
        old = self.pins.pop(key, [])
        self.pin(block_ids)
        self.unpin(old)
        self.pins[key] = list(block_ids)

    def drop_pins(self, key) -> None:
        """Releases a session's resident blocks (they stay cached, and spill to SSD when reused)."""
        self.unpin(self.pins.pop(key, []))

    def relieve_pressure(self) -> bool:
        """Out of blocks: releases the least recently used session; False when none is resident."""
        if not self.pins:
            return False
        self.drop_pins(next(iter(self.pins)))
        self.released += 1
        return True

    def pin(self, block_ids: list[int]) -> None:
        """Holds a reference on blocks (a session keeps its conversation resident)."""
        self.blocks.hold(block_ids)

    def unpin(self, block_ids: list[int]) -> None:
        """Drops references taken by `pin`; the blocks stay cached (LRU) until reused."""
        self.blocks.release(list(reversed(block_ids)))

    def pinned_blocks(self) -> set[int]:
        return {i for ids in self.pins.values() for i in ids}

    def forget(self, key) -> int:
        """Releases a session's blocks and forgets those nobody else holds; returns how many were forgotten."""
        ids = self.pins.get(key, [])
        self.drop_pins(key)
        return self.blocks.clear_cached(ids)

    def import_kv(self, user: str, token_ids: list[int], ks: list, vs: list) -> list[int]:
        """Writes restored K/V blocks into the pool and publishes them to the prefix cache (cached, unpinned).

        Returns:
            The block ids holding them, in order (pin them with `set_pins`). Raises OutOfKVMemory when the pool
            cannot hold them.
        """
        n = ks[0].shape[0] if ks else 0
        if n == 0:
            return []
        free = self.blocks.num_free_blocks
        if n > free:
            raise OutOfKVMemory(f"restoring the session needs {n} KV blocks but only {free} are free; "
                                "raise --kv-cache-memory or close other sessions")
        ids = self.blocks.new_blocks(n)
        self.kv.import_blocks(ids, ks, vs)
        mx.eval(self.kv.k, self.kv.v)
        self.blocks.publish(ids, self.hash_key(user, token_ids), token_ids)
        # One block per position: where the cache already had a block for a position, that one is used.
        held = self.full_blocks(user, token_ids[: n * self.blocks.block_size])
        self.pin(held)
        self.blocks.release(list(reversed(ids)))  # our temporary references (duplicates fall back to free)
        self.unpin(held)
        return held


def block_hashes(blocks: BlockManager, hash_key, user: str, token_ids: list[int], n_blocks: int) -> list[bytes]:
    """The chained hashes of the first `n_blocks` full blocks of `token_ids` for `user` ([] without caching)."""
    probe = Sequence(prompt_ids=list(token_ids) + [0], params=SamplingParams(), user=user)
    probe.hash_key = hash_key(user, token_ids)
    if probe.hash_key is None or n_blocks == 0:
        return []
    return blocks._hash_upto(probe, n_blocks)


def export_state(snapshots, hashes: list[bytes]) -> tuple[list, list] | None:
    """Hybrid models: the state snapshot at the end of `hashes` as float32 numpy arrays and their dtypes."""
    arrays = snapshots.get(hashes[-1]) if snapshots is not None and hashes else None
    if arrays is None:
        return None
    out = [[None if a is None else np.array(a.astype(mx.float32)) for a in arrs] for arrs in arrays]
    dtypes = [[None if a is None else str(a.dtype).split(".")[-1] for a in arrs] for arrs in arrays]
    return out, dtypes


def import_state(snapshots, hashes: list[bytes], arrays: list, dtypes: list) -> None:
    """Stores a session file's state snapshot under the hash of its last block (a restore then resumes there)."""
    if snapshots is None or not hashes:
        return
    snapshots.put(hashes[-1], [[None if a is None else mx.array(a).astype(getattr(mx, d))
                                for a, d in zip(arrs, ds)] for arrs, ds in zip(arrays, dtypes)])
