"""Decides what each engine step computes: prefill chunks for newly admitted sequences, then one batched decode
for every running sequence (continuous batching), preempting by recompute when blocks run out (design.md §8)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from ..cache import BlockManager
from ..errors import OutOfKVMemory
from .sequence import Sequence, SeqStatus


@dataclass(slots=True)
class Batch:
    """One step's work: (sequence, start, end) prefill chunks and the sequences to decode."""

    prefill: list[tuple[Sequence, int, int]] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # stopped by the scheduler (pool too small)

    def __bool__(self):
        return bool(self.prefill or self.decode or self.finished)


class Admissions(Protocol):
    """Told of each sequence's first admission (the prefix cache counts its hits)."""

    def count_admission(self, seq: Sequence) -> None: ...


class Pressure(Protocol):
    """Asked to free blocks when a waiting sequence does not fit (resident sessions release one)."""

    def relieve_pressure(self) -> bool:
        """True if it freed something (the scheduler tries again)."""


class Scheduler:
    """Waiting/running queues over a BlockManager.

    Args:
        blocks: the block manager. max_num_seqs: running sequences at most. prefill_chunk: prompt tokens per
        step at most (long prompts are prefilled over several steps while others keep decoding).
        admissions, pressure: see the protocols above (None: nobody counts; nothing can be freed).
    """

    def __init__(self, blocks: BlockManager, max_num_seqs: int, prefill_chunk: int,
                 admissions: Admissions | None = None, pressure: Pressure | None = None):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.admissions = admissions
        self.pressure = pressure
        self.align_chunks = False  # end prefill chunks on block boundaries (hybrid models' state snapshots)
        # (seq, prompt tokens hit) -> tokens hit: may extend a hit past `allocate`'s (Engine: the last block)
        self.extend_hit = None

    def add(self, seq: Sequence) -> None:
        """Queues a sequence; one that could never fit in the pool fails at once with OutOfKVMemory."""
        slots = seq.num_tokens + 1
        if seq.policy is not None:  # it holds at most its budget (+ the block being filled)
            slots = min(slots, seq.policy.budget + seq.policy.block_size)
        need = self.blocks.blocks_needed(slots)
        total = self.blocks.num_blocks
        if need > total:
            bs = self.blocks.block_size
            raise OutOfKVMemory(
                f"the prompt needs {need} KV blocks ({seq.num_tokens} tokens + 1, block size {bs}) but the pool "
                f"has {total} blocks ({total * bs} tokens); raise --kv-cache-memory or shorten the prompt"
            )
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        """Returns the next step's work (possibly preempting running sequences)."""
        batch = Batch()
        budget = self.prefill_chunk
        # Admit waiting sequences while blocks and seats last; blocks cover the whole prompt up front.
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                if self.pressure is not None and self.pressure.relieve_pressure():
                    continue
                break
            self.waiting.popleft()
            first = seq.prefill_len == 0
            hit = self.blocks.allocate(seq)
            if self.extend_hit is not None:
                hit = self.extend_hit(seq, hit)
            seq.num_computed = hit
            if first:
                seq.num_cached_tokens = hit
                if self.admissions is not None:
                    self.admissions.count_admission(seq)
            seq.prefill_len = seq.num_tokens  # after a preemption this includes the output so far
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                start = seq.num_computed
                end = min(seq.prefill_len, start + budget)
                if self.align_chunks:
                    # hybrid models: chunks end on block boundaries, where state snapshots are taken
                    boundary = end // self.blocks.block_size * self.blocks.block_size
                    end = boundary if start < boundary < end else end
                if seq.policy is not None:
                    # bounded memory: blocks for one chunk at a time (the engine dropped old ones before)
                    end = min(end, start + seq.policy.chunk)
                    if not self.blocks.can_append(seq, 0):
                        continue
                    self.blocks.may_append(seq, 0)
                budget -= end - start
                batch.prefill.append((seq, start, end))
        # Decode everything past prefill; make room for one more slot each, preempting the newest if short.
        decode = [s for s in self.running if not s.in_prefill]
        for seq in list(decode):
            if seq not in self.running:
                continue
            # the token being decoded sits at position num_tokens - 1: slots for num_tokens are needed
            while not self.blocks.can_append(seq, 0):
                victim = self._newest_other(seq)
                if victim is None:
                    break
                self._preempt(victim)
                if victim in decode:
                    decode.remove(victim)
                batch.prefill = [p for p in batch.prefill if p[0] is not victim]
            if self.blocks.can_append(seq, 0):
                self.blocks.may_append(seq, 0)
            else:  # alone and still no room: the pool is smaller than its context, so it cannot grow
                decode.remove(seq)
                self.finish(seq, "kv_full")
                batch.finished.append(seq)
        batch.decode = decode
        return batch

    def _newest_other(self, seq: Sequence) -> Sequence | None:
        for s in reversed(self.running):
            if s is not seq:
                return s
        return None

    def _preempt(self, seq: Sequence) -> None:
        # Recompute policy: drop its blocks; it re-prefills prompt + output so far when re-admitted.
        self.running.remove(seq)
        self.blocks.free(seq)
        self.num_preemptions += 1
        seq.num_computed = 0
        seq.reset_cache_state()
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Marks a sequence finished and releases its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
