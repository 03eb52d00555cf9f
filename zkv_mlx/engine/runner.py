"""Runs the model over the paged pool: prefill chunks one sequence at a time, decode for all sequences at once."""

from __future__ import annotations

import mlx.core as mx

from ..errors import ConfigError
from ..kernels.kv_quant import QuantSpec
from ..models.attention import DecodeMetadata, PrefillMetadata, decode_metadata, prefill_metadata
from ..models.loader import LoadedModel
from ..models.paged import forward, new_states
from ..storage.key_shift import shift_block_keys
from ..storage.kv_pool import KVPool
from .sequence import Sequence
from .window_groups import WindowGroups, split_plan, window_counts


class ModelRunner:
    """Owns the model's forward passes and the KV pool.

    Args:
        lm: the loaded model (its attention modules are replaced by paged ones).
        num_blocks, block_size, kv_dtype: pool geometry.
        kv: the `KVCacheConfig` (its quant settings choose the pool format); None = float storage.
        window_blocks: window blocks per sliding window W (engine/sizing.py); None = as many as num_blocks.
    """

    def __init__(self, lm: LoadedModel, num_blocks: int, block_size: int, kv_dtype: mx.Dtype, kv=None,
                 window_blocks: dict[int, int] | None = None):
        self.lm = lm
        self.model = lm.model
        self.plan = lm.plan
        # Sequences decode as one batch unless a slot needs each sequence's own K/V or cache objects that
        # cannot be stacked (dense / unpaged slots); state layers stack along the batch axis (ArraysCache.merge).
        self.batch_decode = not any(s.dense or not s.paged for s in self.plan.slots)
        # hybrid models: state snapshots at block boundaries let prefix hits resume them (engine/snapshots.py);
        # (unpaged KV slots too: their snapshot is their K/V; unpaged sliding windows have none, such models
        # compute every prompt)
        self.snapshots_ok = self.plan.has_state and all(s.paged or s.window is None for s in self.plan.slots)
        self.snapshots = None  # StateSnapshots, set by the engine
        self.block_size = block_size
        quant = None if kv is None else QuantSpec.from_config(kv)
        if quant is not None and not self.plan.paged_slots:
            # MLA-style models keep mlx-lm's own K/V per sequence: a quantized pool would hold nothing
            raise ConfigError(f"kv_quant {kv.quant!r} (--kv-quant): {lm.family} keeps every layer's K/V outside "
                              "the paged pool (MLA), so it cannot be quantized yet; run it with --kv-quant none")
        # Sliding-window slots live in their own window-sized pools (engine/window_groups.py).
        counts = window_counts(self.plan)
        self.windows: WindowGroups | None = None
        if counts:
            self.plan = split_plan(self.plan)
            self.windows = WindowGroups(counts, window_blocks or {w: num_blocks for w in counts}, block_size,
                                        lm.n_kv_heads, lm.head_dim, kv_dtype, quant)
        n_full = lm.n_layers - sum(counts.values())
        self.pool = KVPool(n_full, num_blocks, lm.n_kv_heads, block_size, lm.head_dim, kv_dtype, quant)
        self._tail_owner: dict[int, Sequence] = {}  # partial block in the tail slab -> its sequence
        self.mass: list | None = None  # h2o: per-block attention mass of the last forward, per sequence (lazy)

    def _plan(self, seqs: list[Sequence], positions: list[list[int]]):
        bs = self.block_size
        # position p lives at cache index p - dropped (long-context policies drop whole blocks)
        blocks = [s.block_table[(p - s.dropped) // bs] for s, ps in zip(seqs, positions) for p in ps]
        offsets = [(p - s.dropped) % bs for s, ps in zip(seqs, positions) for p in ps]
        if self.pool.tail_k:
            # Free the tail rows of partial blocks whose sequence ended or gave the block back.
            for b, s in list(self._tail_owner.items()):
                if s.is_finished or b not in s.block_table:
                    self.pool.drop_tail(b)
                    del self._tail_owner[b]
        plan = self.pool.plan_write(blocks, offsets, [p for ps in positions for p in ps])
        if self.pool.tail_k:
            for s, ps in zip(seqs, positions):
                end = ps[-1] + 1 - s.dropped  # cache rows after this write
                if end % bs:
                    self._tail_owner[s.block_table[end // bs]] = s
        return plan

    def prefill(self, seq: Sequence, start: int, end: int, all_logits: bool = False) -> mx.array:
        """Computes K/V for tokens [start, end) of the sequence.

        Args:
            all_logits: return the logits of every position (evaluation) instead of the last one.
        Returns:
            logits [vocab] of the last position, or [end - start, vocab] (lazy).
        """
        tokens = mx.array(seq.all_ids[start:end], dtype=mx.int32)[None]
        if start == 0:
            # a cold start (or a recompute after preemption) begins with fresh state layers
            seq.state = new_states(self.model, self.plan)
        elif self.plan.has_state and seq.state is None:
            # a prefix hit: resume from the snapshot at its end (the hit limit guarantees one)
            seq.state = self.snapshots.restore(seq, new_states(self.model, self.plan))
        context_len = end - seq.dropped
        n_blocks = -(-context_len // self.block_size)
        plan = self._plan([seq], [list(range(start, end))])
        meta = prefill_metadata(self.pool, start, plan, seq.block_table[:n_blocks], context_len, _wants_mass(seq))
        metas = meta
        if self.windows is not None:  # window groups read and write their own blocks
            metas = {None: meta, **self.windows.prefill_metas(seq, start, end, context_len)}
        if all_logits:
            out = forward(self.model, self.plan, tokens, metas, seq.state)[0]
        else:
            out = forward(self.model, self.plan, tokens, metas, seq.state, last_only=True)[0, -1]
        self.mass = _sum_mass(meta)
        return out

    def decode(self, seqs: list[Sequence], tokens: mx.array | None = None) -> mx.array:
        """One token for each sequence: the last token of each (at position num_tokens - 1).

        Args:
            tokens: [B] the last tokens when they are still being computed (pipelined decode); else read
                from the sequences.
        Returns:
            logits [B, vocab] (lazy).
        """
        if len(seqs) > 1 and not self.batch_decode:
            outs, masses = [], []
            for i, s in enumerate(seqs):
                outs.append(self.decode([s], None if tokens is None else tokens[i : i + 1]))
                masses.append(self.mass[0] if self.mass else None)
            self.mass = masses if any(m is not None for m in masses) else None
            return mx.concatenate(outs, axis=0)
        positions = [s.num_tokens - 1 for s in seqs]
        context_lens = [p + 1 - s.dropped for s, p in zip(seqs, positions)]
        if tokens is None:
            tokens = mx.array([[s.all_ids[-1]] for s in seqs], dtype=mx.int32)
        else:
            tokens = tokens[:, None]
        meta = decode_metadata(self.pool, positions, self._plan(seqs, [[p] for p in positions]),
                               [s.block_table for s in seqs], context_lens, any(_wants_mass(s) for s in seqs))
        metas = meta
        if self.windows is not None:  # window groups read and write their own blocks
            metas = {None: meta, **self.windows.decode_metas(seqs, positions, meta.positions, context_lens)}
        states = _stack_states([s.state for s in seqs]) if self.plan.n_state else []
        out = forward(self.model, self.plan, tokens, metas, states)[:, -1, :]
        if self.plan.n_state and len(seqs) > 1:
            for i, s in enumerate(seqs):
                s.state = [c.extract(i) for c in states]
        self.mass = _sum_mass(meta)
        return out

    # -- long-context policies (engine/drop.py) ------------------------------------------------------
    @property
    def shifts_keys(self) -> bool:
        """Stored keys can be re-rotated (policies): one full-attention paged slot per layer, each layer's
        attention module with its own `rope`, no state layers."""
        slots, layers = self.plan.slots, self.model.layers
        return (not self.plan.has_state and len(slots) == len(layers)
                and all(s.paged and s.window is None and not s.dense for s in slots)
                and all(hasattr(getattr(layer, "self_attn", None), "rope") for layer in layers))

    def policy_blocker(self) -> str:
        """Why `shifts_keys` is False, in words for an error message."""
        p = self.plan
        if p.windows:
            return f"sliding-window layers (window {', '.join(map(str, p.windows))})"
        if p.n_state_layers:
            return "state layers (SSM / linear attention)"
        if any(not s.paged for s in p.slots):
            return "attention layers whose K/V are not paged (MLA)"
        if any(s.dense for s in p.slots):
            return "attention layers that use their K/V themselves (dense, e.g. soft-capped scores)"
        return "attention layers without their own rope module"

    def shift_keys(self, block_ids: list[int], delta: int) -> None:
        """Rotates the stored keys of whole blocks by `delta` more positions (RoPE composes additively); quantized
        blocks are dequantized, rotated and quantized again (storage/key_shift.py)."""
        layers = self.model.layers

        def rotate(i: int, k: mx.array) -> mx.array:
            n, h, bs, d = k.shape
            # one position per row: every row turns by `delta`
            return layers[i].self_attn.rope(k.reshape(n * h * bs, 1, d), offset=delta).reshape(n, h, bs, d)

        shift_block_keys(self.pool, block_ids, rotate)

    def copy_block(self, src: int, dst: int) -> None:
        """Copies one block's K/V (every layer) into another block.

        The source rows are evaluated before they are written: a scatter whose value still reads the same pool
        array cannot reuse that array's buffer, so `a[dst] = a[src]` copied the whole pool (~1 s for a
        3000-block pool here, vs ~1 ms this way).
        """
        arrays = [a for arrs in (self.pool.k, self.pool.v) for x in arrs[:self.pool.n_layers]
                  for a in (x if isinstance(x, (list, tuple)) else (x,))]
        rows = [a[src] for a in arrays]
        mx.eval(rows)
        for a, r in zip(arrays, rows):
            a[dst] = r
        self.pool.copy_slots(src, dst)


def _stack_states(per_seq: list[list]) -> list:
    """The batch's state caches stacked along the batch axis (mlx-lm's own `merge`); B = 1 uses them as they are."""
    if len(per_seq) == 1:
        return per_seq[0]
    return [type(cs[0]).merge(list(cs)) for cs in zip(*per_seq)]


def _wants_mass(seq: Sequence) -> bool:
    return seq.policy is not None and seq.policy.kind == "h2o"


def _sum_mass(meta: PrefillMetadata | DecodeMetadata) -> list | None:
    """Per sequence: attention mass per block-table index summed over layers and heads (lazy), or None."""
    if meta.mass is None:
        return None
    return [sum(parts[1:], parts[0]) if parts else None for parts in meta.mass]
