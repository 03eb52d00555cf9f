"""Window-sized memory for a sliding-window layer group: logical block id -> window block id (issue #16 item 3).

The block manager's logical block tables stay as they are (they address the full-attention layers' pool); the
layers of one sliding window W store their rows in a smaller pool of window blocks. A window block is mapped to a
logical block when the logical block is first written, and released when the block falls wholly outside the
window of every sequence reading it (the query at cache index i sees (i - W, i], after mlx-lm's
`RotatingKVCache(max_size=W)`). When a sequence ends, the window blocks of its last blocks stay mapped while their
logical block is cached (least recently used first out under pressure), so a later prefix hit can continue from
there; `hit_limit` caps a hit to where the blocks its first new query needs are still mapped.

Pure bookkeeping (no MLX); sequences are the block manager's (`seq_id`, `block_table`, `is_finished`,
`all_ids`, `block_hashes`).
"""

from __future__ import annotations

from collections import OrderedDict

from ..errors import OutOfKVMemory

# A retained window block whose rows were imported (session file, SSD) before its logical block was cached: it
# takes the hash of the first prefix hit that finds it.
ADOPT = b""


class WindowBlocks:
    """Maps logical blocks to the window blocks of one sliding-window layer group.

    Args:
        num_blocks: window blocks in the group's pool.
        block_size: token rows per block (the logical one).
        window: W, positions each query sees (itself included).
        on_free: on_free(window block id) when a window block returns to the free list (drops pool-side state
            such as a quantized pool's full-precision tail rows).
    """

    def __init__(self, num_blocks: int, block_size: int, window: int, on_free=None):
        if num_blocks < 1 or block_size < 1 or window < 1:
            raise ValueError(f"num_blocks {num_blocks}, block_size {block_size}, window {window} must be >= 1")
        self.num_blocks, self.block_size, self.window = num_blocks, block_size, window
        self.on_free = on_free
        self.free_ids = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self.of: dict[int, int] = {}  # logical block id -> window block id
        self.refs: dict[int, int] = {}  # logical block id -> sequences holding its window block
        self.retained: OrderedDict[int, bytes] = OrderedDict()  # unheld, kept for prefix hits: lid -> its hash
        self.held: dict[int, tuple] = {}  # seq_id -> (seq, set of logical ids it holds)
        self.reserved: dict[int, tuple] = {}  # seq_id -> (seq, logical ids a prefix hit of it will read)
        self.hash_of = lambda lid: None  # logical block id -> its cached hash (set by the engine)
        self.released = 0  # window blocks freed because they left every reader's window

    # -- geometry ---------------------------------------------------------------------------------------
    def first_block(self, index: int) -> int:
        """Index in a block table of the first block a query at cache index `index` reads."""
        return max(0, index - self.window + 1) // self.block_size

    @property
    def num_held(self) -> int:
        """Window blocks some sequence holds (in use)."""
        return len(self.of) - len(self.retained)

    @property
    def num_retained(self) -> int:
        """Window blocks kept for prefix hits (no sequence holds them)."""
        return len(self.retained)

    # -- per step ---------------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Releases what finished sequences hold and what sequences gave back (preemption, a new table)."""
        for sid, (seq, lids) in list(self.held.items()):
            gone = lids if seq.is_finished else lids - set(seq.block_table)
            for lid in gone:
                self._release(lid)
            lids -= gone
            if not lids:
                del self.held[sid]
        for sid, (seq, _) in list(self.reserved.items()):
            if seq.is_finished:
                del self.reserved[sid]

    def prune(self) -> int:
        """Frees retained window blocks whose logical block's contents are gone (evicted, reused, cleared);
        returns how many."""
        stale = [lid for lid, h in self.retained.items() if h != ADOPT and self.hash_of(lid) != h]
        for lid in stale:
            self._free(lid)
        return len(stale)

    def acquire(self, seq, first: int, last: int) -> list[int]:
        """Holds the window blocks a step of `seq` reads and writes: cache indices [first, last] are written,
        each attending over its window. Releases the sequence's blocks that left its window (and the window of a
        query at the start of `first`'s block).

        Returns:
            The sequence's window table: for each of its logical blocks up to the one holding `last`, the window
            block id (-1 before the window).
        Raises:
            OutOfKVMemory: every window block is held (the pool was sized too small for the running sequences).
            RuntimeError: rows a prefix hit relies on were lost (an internal invariant).
        """
        table = seq.block_table
        # Also keep what a query at the current block boundary reads: a later prefix hit ending at that boundary
        # (e.g. the next turn of a finished conversation) continues from there.
        lo, hi = self.first_block(first - first % self.block_size), last // self.block_size
        _, mine = self.held.setdefault(seq.seq_id, (seq, set()))
        for lid in sorted(x for x in mine if x not in table[lo:hi + 1]):
            mine.discard(lid)
            self._release(lid, out_of_window=True)
        written_from = first // self.block_size
        for j in range(lo, hi + 1):
            lid = table[j]
            if lid in mine:
                continue
            if lid in self.retained and (j >= written_from or not self._current(lid, self.hash_of(lid))):
                self._free(lid)  # stale: the logical block was reused (or is rewritten) since
            if lid in self.of:
                self.retained.pop(lid, None)
                self.refs[lid] = self.refs.get(lid, 0) + 1
            elif j >= written_from:
                self.of[lid] = self._take()
                self.refs[lid] = 1
            else:
                raise RuntimeError(f"window rows of block {lid} (table index {j}) are gone before a read of "
                                   f"sequence {seq.seq_id}")
            mine.add(lid)
        self.reserved.pop(seq.seq_id, None)
        return [self.of[table[j]] if j >= lo else -1 for j in range(hi + 1)]

    def hit_limit(self, blocks):
        """A `BlockManager.hit_limits` entry: (seq, n matched blocks) -> the largest n' <= n whose first new query
        finds the window blocks it reads, which are then reserved for that sequence."""

        def limit(seq, n: int) -> int:
            bs, ids = self.block_size, seq.all_ids
            k = n
            while k > 0:
                need = []
                for j in range(self.first_block(k * bs), k):
                    b = blocks.pool.get_cached_block(seq.block_hashes[j], ids[j * bs:(j + 1) * bs])
                    if b is None and blocks.lower_tier is not None and blocks.lower_tier.contains(
                            seq.block_hashes[j]):
                        continue  # to be promoted: checked again once it is (BlockManager.allocate)
                    if b is None or not self._valid(b.block_id, b.block_hash):
                        k = j  # every hit reading block j fails too: the next candidate ends before it
                        break
                    need.append(b.block_id)
                else:
                    break
            else:
                need = []
            for lid in need:
                if lid in self.retained:
                    self.retained.move_to_end(lid)
            self.reserved[seq.seq_id] = (seq, set(need))
            return k

        return limit

    # -- export / import (engine/window_bytes.py) ---------------------------------------------------------
    def has_rows(self, lid: int) -> bool:
        """The logical block's window rows are stored (an export carries them)."""
        return self._valid(lid, self.hash_of(lid))

    def adopt(self, lid: int) -> int:
        """Maps a window block for rows about to be imported into logical block `lid` (kept for prefix hits,
        held by no sequence); returns its window block id."""
        self.reconcile()
        if lid in self.of and (self.refs.get(lid) or self.retained.get(lid) == ADOPT):
            return self.of[lid]
        if lid in self.of:
            self._free(lid)  # rows of the block's earlier contents
        self.of[lid] = self._take()
        self.retained[lid] = ADOPT
        return self.of[lid]

    # -- internals --------------------------------------------------------------------------------------
    def _valid(self, lid: int, block_hash) -> bool:
        if lid not in self.of:
            return False
        return lid not in self.retained or self._current(lid, block_hash)

    def _current(self, lid: int, block_hash) -> bool:
        # A retained window block still belongs to the logical block's contents (binding an imported one).
        if self.retained[lid] == ADOPT and block_hash is not None:
            self.retained[lid] = block_hash
        return self.retained[lid] == ADOPT or self.retained[lid] == block_hash

    def _release(self, lid: int, out_of_window: bool = False) -> None:
        if lid not in self.refs:
            return  # already freed (its logical block was re-imported)
        self.refs[lid] -= 1
        if self.refs[lid]:
            return
        # A block that left the window stays mapped while its logical block is in the prefix cache (the issue's
        # "released into the LRU with their hashes, not lost"): retained blocks are reused least recently released
        # first (`_take`), so the window pool stays window-sized and a repeated prompt can still hit.
        self.released += out_of_window
        h = self.hash_of(lid)
        if h is None:
            self._free(lid)
        else:
            self.retained[lid] = h

    def _free(self, lid: int) -> None:
        wid = self.of.pop(lid)
        self.refs.pop(lid, None)
        self.retained.pop(lid, None)
        self.free_ids.append(wid)
        if self.on_free is not None:
            self.on_free(wid)

    def _take(self) -> int:
        if not self.free_ids:
            protected = {lid for _, lids in self.reserved.values() for lid in lids}
            victim = next((lid for lid in self.retained if lid not in protected), None)
            if victim is None:
                raise OutOfKVMemory(f"all {self.num_blocks} window blocks (sliding window {self.window}) are in "
                                    "use; raise --kv-cache-memory or lower --max-num-seqs")
            self._free(victim)
        return self.free_ids.pop()
