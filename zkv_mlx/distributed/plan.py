"""A step's plan as int32 lists (rank 0 -> every rank) and the sequences the other ranks rebuild from it.

Layouts (one int32 list per message; `drops` = ids of sequences that ended since the last plan):
    PREFILL: [op, n_drop, *drops, seq_id, start, end, dropped, all_logits, n_tok, *tokens, n_blk, *block_table,
              *windows]
    DECODE:  [op, n_drop, *drops, B, then per sequence: seq_id, num_tokens, dropped, token, n_blk, *block_table,
              then *windows]
    windows: the window block tables rank 0's sliding-window groups chose for the call (engine/window_groups.py):
             [n_calls, per call: n_groups, per group: W, n_seq, per sequence: n, *window table]; [0] without
    COPY:    [op, src, dst]                         SHIFT: [op, delta, n, *block_ids]
    EXPORT:  [op, n, *block_ids]                    IMPORT: [op, dtype code, n, *block_ids] (+ K/V broadcast)
    STATS:   [op]                                   CLOSE: [op]
    SSD_OPEN: [op]                                  FLUSH: [op] (write promoted blocks into the pool)
    SPILL, PROMOTE: [op, block_id, n_hash, *hash as int32, n_tok, *tokens]   (distributed/tiers.py)
    hybrid models' state snapshots (distributed/snapshots.py): SNAP_CAPTURE: [op, seq_id, k];
    SNAP_PUT: [op, seq_id, k, n_hash, *hash]; SNAP_DROP: [op, n, then n times: n_hash, *hash]
A PREFILL of a hybrid model ends with [n_hash, *hash]: the snapshot the chunk resumes from (n_hash 0: none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

(PREFILL, DECODE, COPY, SHIFT, EXPORT, IMPORT, STATS, CLOSE, SSD_OPEN, SPILL, PROMOTE, FLUSH, SNAP_CAPTURE, SNAP_PUT,
 SNAP_DROP) = range(1, 16)
OP_NAMES = {PREFILL: "prefill", DECODE: "decode", COPY: "a block copy", SHIFT: "a key shift", EXPORT: "an export",
            IMPORT: "an import", STATS: "stats", CLOSE: "close", SSD_OPEN: "opening the SSD tier",
            SPILL: "an SSD spill", PROMOTE: "an SSD promotion", FLUSH: "writing promoted blocks",
            SNAP_CAPTURE: "a state snapshot", SNAP_PUT: "storing a state snapshot",
            SNAP_DROP: "dropping state snapshots"}


@dataclass(slots=True)
class ShadowSeq:
    """What a rank > 0 knows of a sequence: enough for `ModelRunner.prefill/decode` (same attribute names as
    `engine.sequence.Sequence`). Its per-sequence caches (`state`) live across steps on this rank."""

    seq_id: int
    num_tokens: int = 0
    dropped: int = 0
    block_table: list[int] = field(default_factory=list)
    all_ids: list[int] = field(default_factory=list)
    state: list | None = None
    policy: object = None  # policies run on rank 0 only (their block drops arrive as COPY/SHIFT)
    is_finished: bool = False
    restore_hash: bytes | None = None  # hybrid models: the snapshot a prefix hit resumes from


def _table(out: list[int], table: list[int]) -> None:
    out.append(len(table))
    out.extend(table)


def encode_prefill(drops: list[int], seq, start: int, end: int, all_logits: bool) -> list[int]:
    out = [PREFILL, len(drops), *drops, seq.seq_id, start, end, seq.dropped, int(all_logits), end - start]
    out.extend(seq.all_ids[start:end])
    _table(out, list(seq.block_table))
    return out


def encode_decode(drops: list[int], seqs: list, tokens: list[int]) -> list[int]:
    out = [DECODE, len(drops), *drops, len(seqs)]
    for s, t in zip(seqs, tokens):
        out.extend((s.seq_id, s.num_tokens, s.dropped, t))
        _table(out, list(s.block_table))
    return out


def encode_windows(record: list | None) -> list[int]:
    """The `windows` part of a PREFILL / DECODE message: per runner call, the tables `WindowGroups.prefill_tables`
    / `decode_tables` chose (None: no window groups)."""
    out = [len(record or [])]
    for call in record or []:
        out.append(len(call))
        for w, tables in call.items():
            out.extend((w, len(tables)))
            for t in tables:
                _table(out, list(t))
    return out


def read_windows(r: "Reader") -> list[dict[int, list[list[int]]]]:
    """The window tables of each call, as `WindowGroups.replay` takes them."""
    calls = []
    for _ in range(r.int()):
        call = {}
        for _ in range(r.int()):
            w = r.int()
            call[w] = [r.ints() for _ in range(r.int())]
        calls.append(call)
    return calls


def hash_words(h: bytes | None) -> list[int]:
    """[n, *words]: a chained hash (bytes, a multiple of 4) as int32 words; [0] for None."""
    words = [] if h is None else np.frombuffer(h, dtype="<i4").tolist()
    return [len(words), *words]


def read_hash(r: "Reader") -> bytes | None:
    words = r.ints()
    return np.array(words, dtype="<i4").tobytes() if words else None


def encode_block(op: int, block_id: int, h: bytes, tokens: list[int]) -> list[int]:
    """A SPILL or PROMOTE message: the block id, its chained hash (bytes, a multiple of 4) and its tokens."""
    return [op, block_id, *hash_words(h), len(tokens), *tokens]


def read_block(r: "Reader") -> tuple[int, bytes, list[int]]:
    """(block id, hash, tokens) of a SPILL or PROMOTE message (after its op)."""
    block_id = r.int()
    h = read_hash(r)
    return block_id, h, r.ints()


class Reader:
    """Reads a message's fields in order."""

    def __init__(self, msg: list[int]):
        self.msg, self.at = msg, 0

    def int(self) -> int:
        self.at += 1
        return self.msg[self.at - 1]

    def ints(self, n: int | None = None) -> list[int]:
        n = self.int() if n is None else n
        self.at += n
        return self.msg[self.at - n : self.at]


def apply_prefill(r: Reader, shadows: dict[int, ShadowSeq]):
    """(sequence, start, end, all_logits) of a PREFILL message, the shadow sequence updated."""
    sid, start, end, dropped, all_logits = (r.int() for _ in range(5))
    tokens = r.ints()
    s = shadows.setdefault(sid, ShadowSeq(sid))
    s.all_ids = [0] * start + tokens  # the runner reads all_ids[start:end] only
    s.num_tokens, s.dropped, s.block_table = end, dropped, r.ints()
    return s, start, end, bool(all_logits)


def apply_decode(r: Reader, shadows: dict[int, ShadowSeq]):
    """(sequences, last tokens) of a DECODE message, the shadow sequences updated."""
    seqs, tokens = [], []
    for _ in range(r.int()):
        sid, n, dropped, token = (r.int() for _ in range(4))
        s = shadows.setdefault(sid, ShadowSeq(sid))
        s.num_tokens, s.dropped, s.block_table = n, dropped, r.ints()
        seqs.append(s)
        tokens.append(token)
    return seqs, tokens


def apply_drops(r: Reader, shadows: dict[int, ShadowSeq]) -> list[int]:
    """Ends the sequences of a message's `drops`; returns their ids."""
    sids = r.ints()
    for sid in sids:
        s = shadows.pop(sid, None)
        if s is not None:
            s.is_finished = True  # the runner frees its partial-block tail rows on the next write plan
    return sids
