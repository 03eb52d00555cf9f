"""Intrusive doubly linked list of free KV blocks (the LRU order for reuse).

A plain `collections.deque` cannot remove an element from the middle in O(1), and a
prefix-cache hit must pull a free-but-cached block out of the queue without a scan.
The links live on the `Block` objects themselves, as in vLLM's `FreeKVCacheBlockQueue`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # the queue only needs `prev_free`/`next_free`; avoids a circular import
    from .block_pool import Block


class _Sentinel:
    """Head/tail marker; with two sentinels every queued block has non-None links."""

    __slots__ = ("prev_free", "next_free")

    def __init__(self) -> None:
        self.prev_free = None
        self.next_free = None


class FreeBlockQueue:
    """FIFO of free blocks: `popleft` yields the block to reuse first.

    A block is in the queue exactly when both of its link fields are set, which lets
    `remove` reject a block that is not queued instead of corrupting the list.
    """

    def __init__(self, blocks: "Iterator[Block] | list[Block]" = ()) -> None:
        """Builds the queue.

        Args:
            blocks: Initial blocks, front to back.
        """
        self._head = _Sentinel()
        self._tail = _Sentinel()
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def _insert_between(self, block: "Block", prev, nxt) -> None:
        if block.prev_free is not None or block.next_free is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        block.prev_free, block.next_free = prev, nxt
        prev.next_free = block
        nxt.prev_free = block
        self._len += 1

    def append(self, block: "Block") -> None:
        """Adds a block at the back (reused last).

        Args:
            block: A block not currently in any free queue.
        """
        self._insert_between(block, self._tail.prev_free, self._tail)

    def appendleft(self, block: "Block") -> None:
        """Adds a block at the front (reused first).

        Args:
            block: A block not currently in any free queue.
        """
        self._insert_between(block, self._head, self._head.next_free)

    def remove(self, block: "Block") -> None:
        """Unlinks a block from anywhere in the queue in O(1).

        Args:
            block: A block currently in this queue.
        """
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def popleft(self) -> "Block":
        """Removes and returns the front block.

        Returns:
            The block that has been free the longest.
        """
        if self._len == 0:
            raise IndexError("popleft from an empty free block queue")
        block = self._head.next_free
        self.remove(block)
        return block

    def blocks(self) -> "Iterator[Block]":
        """Iterates the queued blocks front to back (for tests and debugging).

        Returns:
            An iterator of blocks; do not mutate the queue while iterating.
        """
        node = self._head.next_free
        while node is not self._tail:
            yield node
            node = node.next_free
