"""Block bookkeeping: exact ids, ref counts and free-queue order (no mlx needed)."""

import ast
import pathlib
from dataclasses import dataclass, field

import pytest

from zkv_mlx.cache import Block, BlockManager, BlockPool, FreeBlockQueue


@dataclass
class Seq:
    seq_id: int
    num_tokens: int
    block_table: list = field(default_factory=list)


def free_ids(pool):
    return [b.block_id for b in pool.free_queue.blocks()]


def test_cache_package_is_stdlib_only():
    pkg = pathlib.Path(__file__).resolve().parents[1] / "zkv_mlx" / "cache"
    files = sorted(pkg.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "free_queue.py", "block_pool.py", "block_manager.py"}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"mlx", "numpy", "zkv_mlx"}, (f.name, name)


# ---------------------------------------------------------------- FreeBlockQueue


def test_queue_order_and_popleft():
    blocks = [Block(i) for i in range(4)]
    q = FreeBlockQueue(blocks)
    assert len(q) == 4
    assert [b.block_id for b in q.blocks()] == [0, 1, 2, 3]
    assert q.popleft() is blocks[0]
    assert blocks[0].prev_free is None and blocks[0].next_free is None
    q.appendleft(blocks[0])
    q.append(Block(9))
    assert [b.block_id for b in q.blocks()] == [0, 1, 2, 3, 9]
    assert len(q) == 5


@pytest.mark.parametrize("victim,expected", [(2, [0, 1, 3, 4]), (0, [1, 2, 3, 4]), (4, [0, 1, 2, 3])])
def test_queue_remove_keeps_links(victim, expected):
    blocks = [Block(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[victim])
    assert [b.block_id for b in q.blocks()] == expected
    assert len(q) == 4
    assert blocks[victim].prev_free is None and blocks[victim].next_free is None
    # Links consistent in both directions.
    queued = list(q.blocks())
    for a, b in zip(queued, queued[1:]):
        assert a.next_free is b and b.prev_free is a
    # Head/tail are still reachable: popping drains in the expected order.
    assert [q.popleft().block_id for _ in range(4)] == expected
    assert len(q) == 0
    with pytest.raises(IndexError):
        q.popleft()


def test_queue_rejects_double_insert_and_foreign_remove():
    b = Block(7)
    q = FreeBlockQueue([b])
    with pytest.raises(ValueError, match="7"):
        q.append(b)
    with pytest.raises(ValueError, match="3"):
        q.remove(Block(3))
    assert len(q) == 1


# ---------------------------------------------------------------- BlockPool


def test_fresh_pool_hands_out_ids_in_order():
    pool = BlockPool(5)
    got = pool.get_new_blocks(3)
    assert [b.block_id for b in got] == [0, 1, 2]
    assert [b.ref_count for b in got] == [1, 1, 1]
    assert free_ids(pool) == [3, 4]
    assert (pool.num_free_blocks, pool.num_used_blocks) == (2, 3)


def test_pool_shortage_message_names_numbers():
    pool = BlockPool(4)
    pool.get_new_blocks(3)
    with pytest.raises(ValueError, match=r"need 2 .* only 1 of 4"):
        pool.get_new_blocks(2)
    assert pool.num_free_blocks == 1  # nothing taken by the failed call


def test_free_uncached_blocks_go_to_front_in_given_order_and_refcounts():
    pool = BlockPool(4)
    a, b, c = pool.get_new_blocks(3)
    pool.touch([b])
    assert b.ref_count == 2
    pool.free_blocks([c, b, a])
    assert (a.ref_count, b.ref_count, c.ref_count) == (0, 1, 0)
    # blocks without cached contents are reused first, in reverse of the order freed (table order)
    assert free_ids(pool) == [0, 2, 3]
    pool.free_blocks([b])
    assert free_ids(pool) == [1, 0, 2, 3]
    with pytest.raises(ValueError, match="block 1"):
        pool.free_blocks([b])


def test_touch_free_cached_block_removes_it_from_queue():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    assert pool.cache_full_block(blocks[1], b"h1", [1, 2, 3, 4]) is True
    pool.free_blocks(reversed(blocks))
    assert free_ids(pool) == [0, 2, 3, 1]  # the cached block waits at the back (LRU)
    hit = pool.get_cached_block(b"h1", (1, 2, 3, 4))
    assert hit is blocks[1]
    assert hit.ref_count == 0  # lookup alone takes no reference
    pool.touch([hit])
    assert hit.ref_count == 1
    assert free_ids(pool) == [0, 2, 3]
    assert pool.num_used_blocks == 1
    assert pool.num_cached_blocks == 1
    assert pool.evictions == 0


def test_get_cached_block_refuses_hash_collision():
    pool = BlockPool(2)
    (blk,) = pool.get_new_blocks(1)
    pool.cache_full_block(blk, b"same", [10, 11])
    assert pool.get_cached_block(b"same", [10, 12]) is None
    assert pool.get_cached_block(b"other", [10, 11]) is None
    assert pool.get_cached_block(b"same", [10, 11]) is blk


def test_cache_full_block_first_wins():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    assert pool.cache_full_block(a, b"h", [1]) is True
    assert pool.cache_full_block(b, b"h", [1]) is False
    assert b.block_hash is None
    assert pool.num_cached_blocks == 1
    with pytest.raises(ValueError, match="block 0"):
        pool.cache_full_block(a, b"other", [2])


def test_reusing_cached_block_evicts_it():
    pool = BlockPool(3)
    a, b, c = pool.get_new_blocks(3)
    pool.cache_full_block(a, b"ha", [1, 2])
    pool.cache_full_block(b, b"hb", [3, 4])
    pool.free_blocks([a, c, b])
    assert free_ids(pool) == [2, 0, 1]
    assert pool.num_cached_blocks == 2
    got = pool.get_new_blocks(2)
    assert [x.block_id for x in got] == [2, 0]
    assert pool.evictions == 1
    assert pool.num_cached_blocks == 1
    assert a.block_hash is None and a.token_ids == ()
    assert pool.get_cached_block(b"ha", [1, 2]) is None
    assert pool.get_cached_block(b"hb", [3, 4]) is b


# ---------------------------------------------------------------- BlockManager


def test_blocks_needed_ceil():
    m = BlockManager(8, 4)
    assert [m.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_across_boundary():
    m = BlockManager(8, 4)
    s4, s5 = Seq(1, 4), Seq(2, 5)
    m.allocate(s4)
    m.allocate(s5)
    assert s4.block_table == [0]
    assert s5.block_table == [1, 2]
    assert (m.num_used_blocks, m.num_free_blocks) == (3, 5)
    assert [m.pool.blocks[i].ref_count for i in range(4)] == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="already holds 1"):
        m.allocate(s4)


def test_can_allocate_and_error_message():
    m = BlockManager(3, 4)
    assert m.can_allocate(Seq(1, 12)) is True
    big = Seq(7, 13)
    assert m.can_allocate(big) is False
    with pytest.raises(ValueError, match=r"sequence 7 needs 4 KV blocks for 13 tokens but only 3 are free"):
        m.allocate(big)
    assert big.block_table == []
    assert m.num_free_blocks == 3


def test_may_append_crosses_block_boundary():
    m = BlockManager(3, 4)
    s = Seq(1, 3)
    m.allocate(s)
    assert s.block_table == [0]
    m.may_append(s)  # slot 3 fits in block 0
    assert s.block_table == [0]
    s.num_tokens = 4
    assert m.can_append(s) is True
    m.may_append(s)  # token 4 needs a second block
    assert s.block_table == [0, 1]
    s.num_tokens = 5
    m.may_append(s, n=7)  # slots for 12 tokens -> 3 blocks
    assert s.block_table == [0, 1, 2]
    assert m.can_append(s, n=7) is True  # already covered
    assert m.can_append(s, n=8) is False
    with pytest.raises(ValueError, match=r"needs 1 more KV blocks to append 8 tokens but only 0 are free"):
        m.may_append(s, n=8)


def test_free_returns_blocks_in_reverse_table_order():
    m = BlockManager(6, 4)
    a, b = Seq(1, 9), Seq(2, 4)
    m.allocate(a)
    m.allocate(b)
    assert (a.block_table, b.block_table) == ([0, 1, 2], [3])
    m.free(a)
    assert a.block_table == []
    assert free_ids(m.pool) == [0, 1, 2, 4, 5]
    c = Seq(3, 12)
    m.allocate(c)
    assert c.block_table == [0, 1, 2]
    m.free(b)
    assert free_ids(m.pool) == [3, 4, 5]
    m.free(b)  # already empty: no-op
    assert m.num_free_blocks == 3


def test_usage_dict():
    m = BlockManager(5, 2)
    s = Seq(1, 3)
    m.allocate(s)
    m.pool.cache_full_block(m.pool.blocks[s.block_table[0]], b"h", [1, 2])
    assert m.usage() == {"blocks_total": 5, "blocks_used": 2, "blocks_free": 3, "blocks_cached": 1}
    m.free(s)
    assert m.usage() == {"blocks_total": 5, "blocks_used": 0, "blocks_free": 5, "blocks_cached": 1}
