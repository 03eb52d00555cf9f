"""Prefix caching: chained hashes, exact block ids and ref counts, LRU/TTL/cap/pins, isolation, equivalence."""

from dataclasses import dataclass, field

import pytest

from zkv_mlx.cache import BlockManager
from zkv_mlx.cache.hashing import HashKey, root_hash

PUB = root_hash("fp", "float16;block=4", "public")
ALICE = root_hash("fp", "float16;block=4", "user:alice")
BOB = root_hash("fp", "float16;block=4", "user:bob")


@dataclass(eq=False)
class Seq:
    ids: list
    hash_key: HashKey | None
    seq_id: int = 0
    block_table: list = field(default_factory=list)
    block_hashes: list = field(default_factory=list)
    num_registered: int = 0

    @property
    def num_tokens(self):
        return len(self.ids)

    @property
    def all_ids(self):
        return self.ids


def computed(m, seq):
    """Allocate, then pretend the K/V of every token were written and publish the full blocks."""
    hit = m.allocate(seq)
    m.register_full_blocks(seq, seq.num_tokens)
    return hit


def ids(n, start=100):
    return list(range(start, start + n))


def test_hit_reuses_exact_blocks_and_refcounts():
    m = BlockManager(8, 4)
    a = Seq(ids(10), HashKey(PUB, ALICE))
    assert computed(m, a) == 0
    assert a.block_table == [0, 1, 2]
    assert m.pool.num_cached_blocks == 2  # blocks 0 and 1 are full; block 2 holds 2 tokens
    b = Seq(ids(8) + [7, 7, 7], HashKey(PUB, ALICE), seq_id=1)
    assert m.allocate(b) == 8
    assert b.block_table[:2] == [0, 1] and b.block_table[2] == 3
    assert [m.pool.blocks[i].ref_count for i in (0, 1, 2, 3)] == [2, 2, 1, 1]


def test_last_prompt_token_is_always_recomputed():
    m = BlockManager(8, 4)
    computed(m, Seq(ids(12), HashKey(PUB, ALICE)))
    same = Seq(ids(12), HashKey(PUB, ALICE), seq_id=1)
    # 3 full blocks are cached, but the one holding the last token is not reused: its logits are needed
    assert m.allocate(same) == 8


def test_free_order_lru_and_tail_blocks_first():
    m = BlockManager(6, 4)
    a = Seq(ids(10), HashKey(PUB, ALICE))
    computed(m, a)
    m.free(a)
    # uncached block 2 is reused first (front); cached 1 then 0 at the back: the tail of the prefix goes first
    assert [b.block_id for b in m.pool.free_queue.blocks()] == [2, 3, 4, 5, 1, 0]
    got = m.pool.get_new_blocks(5)
    assert [b.block_id for b in got] == [2, 3, 4, 5, 1]
    assert m.pool.evictions == 1
    assert m.pool.blocks[0].block_hash is not None and m.pool.blocks[1].block_hash is None


def test_ttl_expiry_and_byte_cap_and_pins():
    m = BlockManager(8, 4)
    a = Seq(ids(13), HashKey(PUB, ALICE))
    computed(m, a)  # full blocks 0, 1, 2 cached
    pinned = m.pool.blocks[0]
    m.pool.touch([pinned])  # a pin is a reference that is never dropped
    m.free(a)
    assert list(m.pool.lru) == [2, 1]  # block 0 stays referenced by its pin
    for b in m.pool.blocks:
        b.last_used = 0.0 if b.block_id == 2 else 100.0
    assert m.pool.evict_expired(now=110.0, ttl=20.0) == 1  # block 2 was idle 110 s
    assert list(m.pool.lru) == [1]
    assert m.pool.enforce_cap(0) == 1
    assert list(m.pool.lru) == []
    assert m.pool.clear_cached() == 0
    assert pinned.block_hash is not None and pinned.ref_count == 1  # pinned: never evicted
    # evicted blocks are reused first
    assert [b.block_id for b in m.pool.free_queue.blocks()][:2] == [1, 2]


def test_forced_hash_collision_is_refused_by_token_comparison():
    class Colliding(HashKey):
        def block_hash(self, parent, index, token_ids, block_size):
            return b"same-hash-for-everything"

    m = BlockManager(8, 4)
    computed(m, Seq(ids(9), Colliding(PUB, ALICE)))
    other = Seq(ids(9, start=500), Colliding(PUB, ALICE), seq_id=1)
    assert m.allocate(other) == 0


def test_users_do_not_share_private_blocks_but_share_public_prefix():
    m = BlockManager(16, 4)
    shared = 8
    a = Seq(ids(14), HashKey(PUB, ALICE, shared_len=shared))
    computed(m, a)
    b = Seq(ids(14), HashKey(PUB, BOB, shared_len=shared), seq_id=1)
    assert m.allocate(b) == shared  # only the public blocks
    a2 = Seq(ids(14), HashKey(PUB, ALICE, shared_len=shared), seq_id=2)
    assert m.allocate(a2) == 12
    no_shared = Seq(ids(14), HashKey(PUB, BOB), seq_id=3)
    assert m.allocate(no_shared) == 0
