"""Where one forward pass's new K/V rows go in the pool (`KVPool.plan_write` builds it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx


@dataclass(slots=True)
class WritePlan:
    """Where one forward pass's N new rows go (the same for every layer).

    blocks, offsets: [N] int32 block id and in-block offset of each row.
    For per-channel keys: `tail_*` rows go to the slab; `full_rows`/`full_ids` cover whole blocks written at once;
    `completions` are (slot, first offset, row start, row end, block id) of blocks that fill in this write.
    """

    blocks: mx.array
    offsets: mx.array
    tail_rows: mx.array | None = None
    tail_slots: mx.array | None = None
    tail_offsets: mx.array | None = None
    full_rows: mx.array | None = None
    full_ids: mx.array | None = None
    full_sink: list = field(default_factory=list)  # per full block: it is a first block (has sink rows)
    completions: list = field(default_factory=list)
    sink_rows: mx.array | None = None  # rows at positions < sinks, and their sink-slab slots and offsets
    sink_slots: mx.array | None = None
    sink_offsets: mx.array | None = None
    cols: tuple | None = None  # (blocks[:, None], offsets[:, None]), made once for all layers
    row: tuple[int, int] | None = None  # one-row writes (a B = 1 decode step): its (block, offset) as ints


def scatter(dst: list[mx.array], index: tuple, parts) -> None:
    for i, p in enumerate(parts):
        dst[i][index] = p
