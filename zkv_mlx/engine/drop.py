"""Applies a sequence's long-context policy (cache/policy.py) to its blocks and the pool.

Dropping blocks: the chosen blocks leave the block table (their reference is released), `seq.dropped` grows so
that position p maps to cache index p - dropped, and the keys of kept blocks that sat before a dropped block are
rotated forward by the dropped tokens after them. Queries and new keys keep their original positions, so every
query sees its keys at their distance within the cache, as StreamingLLM positions them. A block shared with
other sequences or published in the prefix cache is copied before it is rotated (copy on write).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..cache.policy import rotation_shifts
from .sequence import Sequence


def add_mass(seq: Sequence, mass: mx.array | None, n_queries: int) -> None:
    """Folds one forward's attention mass per block-table index into the h2o scores.

    Each block's score is its attention mass per query (summed over layers and heads), averaged with exponential
    decay: after n more queries the old score weighs 0.5 ** (n / half_life). A block's first forward sets it.
    """
    if mass is None:
        return
    m = np.array(mass.astype(mx.float32)).tolist()
    grow = len(m) - len(seq.mass)
    if grow > 0:
        seq.mass.extend([0.0] * grow)
        seq.seen.extend([0] * grow)
    keep = 0.5 ** (n_queries / seq.policy.half_life)
    for i, x in enumerate(m):
        x /= n_queries
        seq.mass[i] = x if not seq.seen[i] else keep * seq.mass[i] + (1.0 - keep) * x
        seq.seen[i] += n_queries


def scores(seq: Sequence, n_blocks: int) -> list[float]:
    """h2o: log of each block's decayed attention mass per query times the recency prior exp(-age / recency).

    Age is the block's distance in tokens from the end of the cache (table index n_blocks - 1 has age 0). In log
    space, so old blocks of a long budget do not underflow; blocks without evidence yet rank highest, blocks
    without mass lowest (oldest first).
    """
    pol = seq.policy
    per_token = 1.0 / pol.recency if pol.recency else 0.0
    out = []
    for i in range(n_blocks):
        if i >= len(seq.seen) or not seq.seen[i]:
            out.append(math.inf)
        elif seq.mass[i] <= 0.0:
            out.append(-math.inf)
        else:
            out.append(math.log(seq.mass[i]) - (n_blocks - 1 - i) * pol.block_size * per_token)
    return out


def enforce(seq: Sequence, n_new: int, runner, release, private) -> list[int]:
    """Drops blocks so that the sequence's cache plus `n_new` tokens fits its budget.

    Args:
        runner: the ModelRunner (rotates keys in its pool).
        release: release(block_id) drops the sequence's reference to a block.
        private: private(block_id) -> a block id with the same contents that only this sequence uses and that is
            not published in the prefix cache (the same id if it already is).
    Returns:
        The dropped block ids.
    """
    pol = seq.policy
    if pol is None:
        return []
    table = seq.block_table
    sc = scores(seq, len(table)) if pol.kind == "h2o" else None
    drop = pol.drops(seq.cache_len, n_new, sc)
    if not drop:
        return []
    dropped = set(drop)
    shifts = rotation_shifts(len(table), drop, pol.block_size)
    gone = [table[i] for i in drop]
    kept = [b for i, b in enumerate(table) if i not in dropped]
    for b in gone:
        release(b)
    groups: dict[int, list[int]] = {}
    for j, (b, d) in enumerate(zip(kept, shifts)):
        if d:
            kept[j] = private(b)
            groups.setdefault(d, []).append(kept[j])
    for d, ids in groups.items():
        runner.shift_keys(ids, d)
    seq.block_table[:] = kept
    seq.dropped += len(drop) * pol.block_size
    if seq.mass:
        seq.mass[:] = [m for i, m in enumerate(seq.mass) if i not in dropped]
        seq.seen[:] = [s for i, s in enumerate(seq.seen) if i not in dropped]
    return gone


def n_new(seq: Sequence, prefill_chunk: int) -> int:
    """Tokens the next step writes for a sequence under a policy (a prefill chunk, or the decode token)."""
    if seq.in_prefill:
        return min(seq.policy.chunk, seq.prefill_len - seq.num_computed, prefill_chunk)
    return seq.num_tokens - seq.num_computed


def will_drop(seq: Sequence, prefill_chunk: int) -> bool:
    """Whether the policy drops blocks of `seq` before its next step (KVPolicy.drops() is non-empty)."""
    if seq.is_finished or not seq.block_table:
        return False
    return seq.cache_len + n_new(seq, prefill_chunk) > seq.policy.budget


def apply(seqs: list[Sequence], prefill_chunk: int, runner, blocks) -> int:
    """Drops blocks of the sequences about to outgrow their budget (before blocks are allocated).

    Args:
        seqs: running sequences with a policy. runner: the ModelRunner. blocks: the BlockManager.
    Returns:
        The number of blocks dropped.
    """
    n = 0
    for seq in seqs:
        if seq.is_finished or not seq.block_table:
            continue
        n += len(enforce(seq, n_new(seq, prefill_chunk), runner, lambda b: blocks.release([b]),
                         lambda b: blocks.private_copy(b, runner.copy_block)))
    return n
