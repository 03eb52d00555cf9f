"""The per-step attention metadata and the one place that picks the attention path.

After vLLM's attention metadata (`block_tables`, `context_lens`, `slot_mapping` for writes) and mlx-lm's single
dispatch point (`models/base.py: scaled_dot_product_attention`): the runner builds a `PrefillMetadata` or a
`DecodeMetadata` once per forward pass (`prefill_metadata`, `decode_metadata`), `decode_path` picks the decode
path there, and `attend` is the only function that branches on it.

Paths: prefill gathers the sequence's blocks and runs the reference prefill attention (design.md §3), except
short chunks on the CPU, which read the blocks from the pool (`_prefill`).
Decode runs one of
- "grouped": CPU, float pool. Sequences up to `GROUPED_MAX_LEN` positions in groups of equal block count (one
  batched graph per group), longer ones (and h2o ones) alone; a sequence's result never depends on the rest of
  the batch, so batched decode is bitwise equal to solo decode.
- "quantized": CPU, quantized pool. Each sequence alone, straight from the packed blocks where
  `mx.quantized_matmul` takes the group size, else from its dequantized blocks.
- "metal": the paged Metal kernels (which fall back to the reference with one warning when a variant fails).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..kernels import kernel_path, prefill_attention_reference
from ..kernels.prefill import prefill_attention
from ..kernels.prefill_cpu import paged_chunk_attention
from ..kernels.dispatch import metal_available, metal_paged_attention
from ..kernels.reference import GROUPED_MAX_LEN, decode_plan, grouped_decode_attention, single_decode_attention
from ..storage.kv_pool import KVPool, WritePlan

DECODE_PATHS = ("grouped", "quantized", "metal")
# Prefill chunks of up to this many tokens on the CPU read the pool (`_prefill`), longer ones (cold prefill) take
# the tiled path; A/B scripts (docs/experiments/ab_suffix_chunk.py) set 1: the 1-token path only, as before.
CHUNK_MAX_QUERIES = 128


@dataclass(slots=True)
class PrefillMetadata:
    """One sequence's chunk of L new tokens (B = 1).

    positions: position of the first new token (the rope offset).
    slot_mapping: where the L new K/V rows go (`KVPool.plan_write`).
    block_table: the sequence's blocks covering its first `context_len` cache rows (a list for quantized pools,
        else int32 [nb]); context_len: cache rows to attend over, the new ones included.
    mass: h2o: [[]] to collect each layer's attention mass per block, else None.
    """

    pool: KVPool
    positions: int
    slot_mapping: WritePlan
    block_table: list[int] | mx.array
    context_len: int
    mass: list[list] | None = None
    block_ids: list[int] | None = None  # block_table as Python ints (a 1-token chunk reads the pool in place)
    plan: tuple | None = None  # that chunk's `decode_plan` (built on first use, shared by the layers)

    is_prefill = True

    @property
    def offset(self) -> int:
        """Rope offset of the first new token (mlx-lm's `cache.offset`)."""
        return self.positions


@dataclass(slots=True)
class DecodeMetadata:
    """One new token for each of B sequences.

    positions: int32 [B] position of each new token; slot_mapping: where the B new rows go.
    path: one of `DECODE_PATHS` (chosen by `decode_path`).
    block_tables, context_lens: per sequence its block ids and number of cache rows (the new one included).
    mass: h2o: per sequence, a list collecting each layer's attention mass per block; else None.
    groups: "grouped" path: [(member indices, block tables int32 [G, nb], context lens int32 [G])].
    plans: "grouped" path: per sequence its `decode_plan`, None where the sequence is in a group.
    kernel_args: "metal" path: (block tables int32 [B, nb] zero-padded, context lens int32 [B], max length).
    """

    pool: KVPool
    positions: mx.array
    slot_mapping: WritePlan
    path: str
    block_tables: list[list[int]]
    context_lens: list[int]
    mass: list[list] | None = None
    groups: list | None = None
    plans: list | None = None
    kernel_args: tuple | None = None
    window_plans: dict | None = None  # sliding window W -> per sequence its decode_plan (built on first use)

    is_prefill = False

    @property
    def offset(self) -> mx.array:
        """Rope offset of each sequence's new token, int32 [B] (mlx-lm's batched `cache.offset`)."""
        return self.positions


def decode_path(pool: KVPool) -> str:
    """Picks the decode attention path (see the module docstring): the one place that does.

    Returns:
        "metal" when the kernels are in use (`ZKV_KERNELS`, kernels/dispatch.py), else "grouped" for a float
        pool and "quantized" for a quantized one.
    """
    if kernel_path() == "metal":
        return "metal"
    return "grouped" if pool.quant is None else "quantized"


def prefill_metadata(pool: KVPool, start: int, slot_mapping: WritePlan, block_table: list[int], context_len: int,
                     want_mass: bool) -> PrefillMetadata:
    """Builds the metadata of one prefill chunk (new tokens from position `start`).

    Args:
        block_table: the sequence's blocks covering its first `context_len` cache rows.
        want_mass: collect attention mass per block (h2o).
    """
    table = block_table if pool.quant is not None else mx.array(block_table, dtype=mx.int32)
    return PrefillMetadata(pool, start, slot_mapping, table, context_len, mass=[[]] if want_mass else None,
                           block_ids=list(block_table))


def decode_metadata(pool: KVPool, positions: list[int], slot_mapping: WritePlan, block_tables: list[list[int]],
                    context_lens: list[int], want_mass: bool) -> DecodeMetadata:
    """Builds one decode step's metadata (once for all layers).

    Args:
        positions: each sequence's new token position; block_tables, context_lens: per sequence.
        want_mass: collect attention mass per block (h2o).
    """
    bs = pool.block_size
    meta = DecodeMetadata(pool, mx.array(positions, dtype=mx.int32), slot_mapping, decode_path(pool), block_tables,
                          context_lens, mass=[[] for _ in block_tables] if want_mass else None)
    if meta.path == "grouped":
        if not want_mass:
            meta.groups = _groups(block_tables, context_lens, bs)
        meta.plans = [None if not want_mass and n <= GROUPED_MAX_LEN else decode_plan(t, n, bs)
                      for t, n in zip(block_tables, context_lens)]
    elif meta.path == "metal":
        n_blocks = max(-(-n // bs) for n in context_lens)
        padded = [t[:n_blocks] + [0] * (n_blocks - min(n_blocks, len(t))) for t in block_tables]
        meta.kernel_args = (mx.array(padded, dtype=mx.int32), mx.array(context_lens, dtype=mx.int32),
                            max(context_lens))
    return meta


def _groups(block_tables: list[list[int]], context_lens: list[int], bs: int) -> list:
    """Short sequences grouped by block count for `grouped_decode_attention` (built once per step)."""
    by_nb: dict[int, list[int]] = {}
    for i, n in enumerate(context_lens):
        if n <= GROUPED_MAX_LEN:
            by_nb.setdefault(-(-n // bs), []).append(i)
    groups = []
    for nb, members in by_nb.items():
        tables = mx.array([block_tables[i][:nb] for i in members], dtype=mx.int32)
        groups.append((members, tables, mx.array([context_lens[i] for i in members], dtype=mx.int32)))
    return groups


def attend(q: mx.array, layer: int, meta: PrefillMetadata | DecodeMetadata, scale: float, *,
           window: int | None = None, sinks: mx.array | None = None) -> mx.array:
    """Attention of the new queries over the pool (their own K/V rows already written).

    Args:
        q: [B, n_heads, L, head_dim] rotated queries.
        window: sliding window W: the query at cache index i sees cache indices (i - W, i]
            (mlx-lm's `RotatingKVCache(max_size=W)`); None = full attention.
        sinks: float [n_heads] attention-sink logits (gpt-oss): they join each head's softmax denominator and
            add no value (as `mx.fast.scaled_dot_product_attention(..., sinks=)`).
    Returns:
        [B, n_heads, L, head_dim].
    """
    if meta.is_prefill:
        return _prefill(q, layer, meta, scale, window, sinks)
    if meta.path == "grouped":
        return _grouped(q, layer, meta, scale, window, sinks)
    if meta.path == "quantized":
        return _quantized(q, layer, meta, scale, window, sinks)
    return _metal(q, layer, meta, scale, window, sinks)


def _prefill(q: mx.array, layer: int, meta: PrefillMetadata, scale: float, window, sinks) -> mx.array:
    bs, n, table = meta.pool.block_size, meta.context_len, meta.block_table
    if q.shape[2] <= CHUNK_MAX_QUERIES and meta.pool.quant is None and meta.mass is None and window is None \
            and sinks is None and kernel_path() != "metal":
        # A short chunk (a prefix hit's suffix, or its last token) reads the sequence's blocks from the pool; the
        # gather below would copy every layer's K/V twice for a few query rows.
        if meta.plan is None:
            meta.plan = decode_plan(meta.block_ids, n, bs)
        if q.shape[2] == 1:
            return single_decode_attention(q, meta.pool.k[layer], meta.pool.v[layer], meta.block_ids, n, scale,
                                           plan=meta.plan)
        if not metal_available():  # on the GPU (ZKV_KERNELS=reference) the fused SDPA below does better
            return paged_chunk_attention(q, meta.pool.k[layer], meta.pool.v[layer], meta.plan[0], meta.block_ids,
                                         n, scale)
    if window is not None:
        # only the blocks some query of the chunk can see: from the first query's window start on
        first = max(0, n - q.shape[2] - window + 1) // bs
        if first:
            keys, values = meta.pool.gather(layer, table[first:], n - first * bs)
            return prefill_attention(q, keys, values, scale, window=window, sinks=sinks)
    keys, values = meta.pool.gather(layer, table, n)
    if meta.mass is None:
        return prefill_attention(q, keys, values, scale, window=window, sinks=sinks)
    per_pos: list = []
    out = prefill_attention(q, keys, values, scale, mass_out=per_pos, window=window, sinks=sinks)
    nb = -(-n // bs)
    meta.mass[0].append(mx.pad(per_pos[0], (0, nb * bs - n)).reshape(nb, bs).sum(axis=1))
    return out


def _grouped(q: mx.array, layer: int, meta: DecodeMetadata, scale: float, window, sinks) -> mx.array:
    B = q.shape[0]
    kp, vp = meta.pool.k[layer], meta.pool.v[layer]
    outs: list = [None] * B
    for members, tables, lens in meta.groups or ():
        if len(members) == B:  # the whole batch in one group
            return grouped_decode_attention(q, kp, vp, tables, lens, scale, window=window, sinks=sinks)
        o = grouped_decode_attention(q[mx.array(members, dtype=mx.int32)], kp, vp, tables, lens, scale,
                                     window=window, sinks=sinks)
        for j, i in enumerate(members):
            outs[i] = o[j : j + 1]
    plans = _plans(meta, window)
    for i, (t, n) in enumerate(zip(meta.block_tables, meta.context_lens)):
        if outs[i] is None:
            outs[i] = single_decode_attention(q if B == 1 else q[i : i + 1], kp, vp, t, n, scale,
                                              None if meta.mass is None else meta.mass[i],
                                              plans[i] if plans else None, window=window, sinks=sinks)
    return outs[0] if B == 1 else mx.concatenate(outs, axis=0)


def _plans(meta: DecodeMetadata, window: int | None) -> list | None:
    """Per sequence its `decode_plan` for this layer's window (built once per step and window)."""
    if window is None or meta.plans is None:
        return meta.plans
    if meta.window_plans is None:
        meta.window_plans = {}
    if window not in meta.window_plans:
        bs = meta.pool.block_size
        meta.window_plans[window] = [None if p is None else decode_plan(t, n, bs, window)
                                     for p, t, n in zip(meta.plans, meta.block_tables, meta.context_lens)]
    return meta.window_plans[window]


def _quantized(q: mx.array, layer: int, meta: DecodeMetadata, scale: float, window, sinks) -> mx.array:
    pool, outs = meta.pool, []
    if not pool.reads_quantized and (window is not None or sinks is not None):
        return _windowed(q, layer, meta, scale, window, sinks)
    for i, (t, n) in enumerate(zip(meta.block_tables, meta.context_lens)):
        if meta.mass is not None:  # h2o: the attention mass per block, from the dequantized blocks
            keys, values = pool.gather(layer, t, n)
            per_pos: list = []
            outs.append(prefill_attention_reference(q[i : i + 1], keys, values, scale, mass_out=per_pos))
            nb = -(-n // pool.block_size)
            meta.mass[i].append(mx.pad(per_pos[0], (0, nb * pool.block_size - n)).reshape(nb, -1).sum(axis=1))
            continue
        if pool.reads_quantized:  # straight from the packed blocks (mx.quantized_matmul)
            outs.append(pool.decode_attention(layer, q[i : i + 1], t, n, scale, window=window, sinks=sinks))
            continue
        keys, values = pool.gather(layer, t, n)
        outs.append(prefill_attention_reference(q[i : i + 1], keys, values, scale))
    return outs[0] if q.shape[0] == 1 else mx.concatenate(outs, axis=0)


def _metal(q: mx.array, layer: int, meta: DecodeMetadata, scale: float, window, sinks) -> mx.array:
    pool = meta.pool
    tables, lens, max_len = meta.kernel_args
    if meta.mass is None:
        return metal_paged_attention(q, pool.k_pool(layer), pool.v_pool(layer), tables, lens, scale, max_len,
                                     window=window, sinks=sinks)
    out, mass = metal_paged_attention(q, pool.k_pool(layer), pool.v_pool(layer), tables, lens, scale, max_len,
                                      return_mass=True, window=window, sinks=sinks)
    bs = pool.block_size
    for i, parts in enumerate(meta.mass):
        parts.append(mass[i, : -(-meta.context_lens[i] // bs)])
    return out


def _windowed(q: mx.array, layer: int, meta, scale: float, window: int | None, sinks) -> mx.array:
    """Sliding-window / attention-sink layers: each sequence's visible rows gathered from the pool, then MLX's
    fused attention with an explicit mask and the sink logits."""
    if meta.mass is not None:
        raise ValueError("attention mass (h2o) is not collected on sliding-window or sink layers")
    if meta.is_prefill:
        seqs = [(meta.block_table, meta.context_len)]
    else:
        seqs = list(zip(meta.block_tables, meta.context_lens))
    L = q.shape[2]
    outs = []
    for i, (table, n) in enumerate(seqs):
        lo = 0 if window is None else max(0, n - L - window + 1)
        # read from the window's first block on: earlier ones may be released (engine/window_groups.py)
        b0 = lo // meta.pool.block_size
        k, v = meta.pool.gather(layer, table[b0:], n - b0 * meta.pool.block_size)
        skip = lo - b0 * meta.pool.block_size
        k, v = k[:, :, skip:].astype(q.dtype), v[:, :, skip:].astype(q.dtype)
        mask = None
        if L > 1 or window is not None:
            kpos = mx.arange(lo, n)[None, :]
            qpos = mx.arange(n - L, n)[:, None]
            mask = kpos <= qpos
            if window is not None:
                mask = mask & (kpos > qpos - window)
        sk = None if sinks is None else sinks.astype(q.dtype)
        outs.append(mx.fast.scaled_dot_product_attention(q[i : i + 1], k, v, scale=scale, mask=mask, sinks=sk))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
