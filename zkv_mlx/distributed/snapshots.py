"""Hybrid models' state snapshots (engine/snapshots.py) in a distributed run: every rank keeps the per-sequence
state of its shard (its linear-attention / SSM heads) and its own snapshots of it, taken, stored, dropped and
restored when rank 0's are.

Rank 0's `LeaderSnapshots` is the engine's `StateSnapshots`; each change to it becomes a plan message:
SNAP_CAPTURE (a sequence's state after the step that just crossed block boundary k: every rank copies its own),
SNAP_PUT (that copy stored under the block's chained hash, once known), SNAP_DROP (hashes evicted by rank 0's byte
cap). A prefill that resumes a prefix hit carries the hash it resumes from (plan.py), so ranks > 0 need neither
block hashes nor a cap of their own: their store always holds the same hashes as rank 0's.
"""

from __future__ import annotations

from ..engine.snapshots import StateSnapshots, _arrays, _fill, state_bytes
from ..errors import SessionError
from . import plan as P


class LeaderSnapshots(StateSnapshots):
    """Rank 0's snapshots: as `StateSnapshots`, every change also sent to the other ranks.

    Args:
        max_bytes, block_size: as `StateSnapshots` (the cap counts rank 0's bytes; the others follow its
            evictions). leader: rank 0's `LeaderRunner`.
    """

    def __init__(self, max_bytes: int, block_size: int, leader):
        super().__init__(max_bytes, block_size)
        self.leader = leader
        self._publishing = False

    def capture(self, seq) -> None:
        before = dict(seq.snapshots_pending)
        super().capture(seq)
        for k, arrays in seq.snapshots_pending.items():
            if before.get(k) is not arrays:
                self.leader.send([P.SNAP_CAPTURE, seq.seq_id, k])

    def publish(self, seq) -> None:
        hashes = seq.block_hashes
        for k in [k for k in seq.snapshots_pending if k <= len(hashes)]:
            self.leader.send([P.SNAP_PUT, seq.seq_id, k, *P.hash_words(hashes[k - 1])])
            self._publishing = True
            try:
                self.put(hashes[k - 1], seq.snapshots_pending.pop(k))
            finally:
                self._publishing = False

    def put(self, block_hash: bytes, arrays: list[list]) -> None:
        if not self._publishing:  # a session import: its state would reach rank 0's shard only
            raise SessionError(_SESSIONS + ONE_MACHINE)
        before = list(self._store)
        super().put(block_hash, arrays)
        gone = [h for h in before if h not in self._store]
        if gone:
            self.leader.send([P.SNAP_DROP, len(gone), *[w for h in gone for w in P.hash_words(h)]])

    def get(self, block_hash: bytes):
        raise SessionError(_SESSIONS + ONE_MACHINE)  # only session exports read snapshots by hash


# What to do about it (the API adds the same to its up-front refusal).
ONE_MACHINE = "; run without a session (drop --session), or run the model on one machine (one process, without --distributed)"
_SESSIONS = ("sessions of a hybrid model (state layers) cannot be saved, exported or imported in a distributed "
             "run yet (each rank holds its own part of the state)")


class WorkerSnapshots(StateSnapshots):
    """A rank > 0's snapshots: the same hashes as rank 0's store (no cap of its own), its shard's arrays."""

    def __init__(self, block_size: int):
        super().__init__(max_bytes=1 << 62, block_size=block_size)
        self.pending: dict[tuple[int, int], list[list]] = {}  # (seq id, k) -> state copy, until SNAP_PUT

    def apply(self, op: int, r: P.Reader, shadows: dict) -> None:
        """Applies a SNAP_CAPTURE / SNAP_PUT / SNAP_DROP message (after its op)."""
        if op == P.SNAP_CAPTURE:
            sid, k = r.int(), r.int()
            self.pending[(sid, k)] = _arrays(shadows[sid].state)
        elif op == P.SNAP_PUT:
            sid, k = r.int(), r.int()
            self.put(P.read_hash(r), self.pending.pop((sid, k)))
        else:
            for _ in range(r.int()):
                arrays = self._store.pop(P.read_hash(r), None)
                if arrays is not None:
                    self.nbytes -= state_bytes(arrays)

    def forget(self, seq_id: int) -> None:
        """Drops the uncommitted copies of a sequence that ended."""
        for key in [key for key in self.pending if key[0] == seq_id]:
            del self.pending[key]

    def restore(self, seq, fresh: list) -> list:
        """The state a prefix hit resumes from: the snapshot rank 0 named in the plan (`seq.restore_hash`)."""
        for c, arrs in zip(fresh, self._store[seq.restore_hash]):
            _fill(c, arrs)
        return fresh
