"""Per-sequence block tables over a `BlockPool` (nano-vllm style paired can_X / X verbs).

A sequence is any object with `seq_id`, `num_tokens` (tokens that need KV slots) and
`block_table` (list of block ids, written only here). Prefix matching is not done yet: the seam
is `self.pool` (`get_cached_block`, `touch`, `cache_full_block`), which a prefix-aware
`allocate` can use before falling back to `get_new_blocks`.
"""

from __future__ import annotations

from .block_pool import BlockPool


class BlockManager:
    """Maps sequences to KV blocks of `block_size` token slots each."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        """Creates the pool.

        Args:
            num_blocks: Total KV blocks available.
            block_size: Token slots per block.
        """
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

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

    def can_allocate(self, seq) -> bool:
        """Whether `allocate(seq)` would succeed now.

        Args:
            seq: A sequence without blocks.

        Returns:
            True if enough free blocks exist for `seq.num_tokens`.
        """
        return self.blocks_needed(seq.num_tokens) <= self.pool.num_free_blocks

    def allocate(self, seq) -> None:
        """Gives a sequence blocks for all of its `num_tokens`.

        Args:
            seq: A sequence with an empty block_table.
        """
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already holds {len(seq.block_table)} blocks")
        needed = self.blocks_needed(seq.num_tokens)
        free = self.pool.num_free_blocks
        if needed > free:
            raise ValueError(
                f"sequence {seq.seq_id} needs {needed} KV blocks for {seq.num_tokens} tokens "
                f"but only {free} are free"
            )
        seq.block_table.extend(b.block_id for b in self.pool.get_new_blocks(needed))

    def can_append(self, seq, n: int = 1) -> bool:
        """Whether `may_append(seq, n)` would succeed now.

        Args:
            seq: An allocated sequence.
            n: Tokens about to be added.

        Returns:
            True if the blocks needed for `seq.num_tokens + n` slots are available.
        """
        return self._missing(seq, seq.num_tokens + n) <= self.pool.num_free_blocks

    def may_append(self, seq, n: int = 1) -> None:
        """Ensures slots exist for `seq.num_tokens + n` tokens, adding blocks at boundaries.

        Args:
            seq: An allocated sequence; the caller bumps `num_tokens` after writing.
            n: Tokens about to be added.
        """
        missing = self._missing(seq, seq.num_tokens + n)
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

    def slot_mapping(self, seq, start: int, end: int) -> list[int]:
        """Flat KV slot indices for token positions start..end-1.

        Args:
            seq: An allocated sequence.
            start: First token position (inclusive).
            end: Last token position (exclusive).

        Returns:
            `block_id * block_size + offset` per position.
        """
        capacity = len(seq.block_table) * self.block_size
        if not 0 <= start <= end <= capacity:
            raise ValueError(
                f"positions {start}..{end} out of range for sequence {seq.seq_id} "
                f"with {capacity} slots"
            )
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def usage(self) -> dict[str, int]:
        """Pool occupancy snapshot.

        Returns:
            {blocks_total, blocks_used, blocks_free, blocks_cached}.
        """
        return {
            "blocks_total": self.pool.num_blocks,
            "blocks_used": self.pool.num_used_blocks,
            "blocks_free": self.pool.num_free_blocks,
            "blocks_cached": self.pool.num_cached_blocks,
        }
