"""Runs the model over the paged pool: prefill chunks one sequence at a time, decode for all sequences at once."""

from __future__ import annotations

import mlx.core as mx

from ..kernels import kernel_path
from ..kernels.kv_quant import QuantSpec
from ..models.loader import LoadedModel
from ..models.paged import AttnContext, forward, install_paged_attention
from ..storage.kv_pool import KVPool
from .sequence import Sequence


class ModelRunner:
    """Owns the model's forward passes and the KV pool.

    Args:
        lm: the loaded model (its attention modules are replaced by paged ones).
        num_blocks, block_size, kv_dtype: pool geometry.
        kv: the `KVCacheConfig` (its quant settings choose the pool format); None = float storage.
    """

    def __init__(self, lm: LoadedModel, num_blocks: int, block_size: int, kv_dtype: mx.Dtype, kv=None):
        self.lm = lm
        self.model = lm.model
        install_paged_attention(self.model)
        self.block_size = block_size
        quant = None if kv is None else QuantSpec.from_config(kv)
        self.pool = KVPool(lm.n_layers, num_blocks, lm.n_kv_heads, block_size, lm.head_dim, kv_dtype, quant)
        self._tail_owner: dict[int, Sequence] = {}  # partial block in the tail slab -> its sequence

    def _plan(self, seqs: list[Sequence], positions: list[list[int]]):
        bs = self.block_size
        blocks = [s.block_table[p // bs] for s, ps in zip(seqs, positions) for p in ps]
        offsets = [p % bs for ps in positions for p in ps]
        if self.pool.tail_k:
            # Free the tail rows of partial blocks whose sequence ended or gave the block back.
            for b, s in list(self._tail_owner.items()):
                if s.is_finished or b not in s.block_table:
                    self.pool.drop_tail(b)
                    del self._tail_owner[b]
        plan = self.pool.plan_write(blocks, offsets, [p for ps in positions for p in ps])
        if self.pool.tail_k:
            for s, ps in zip(seqs, positions):
                end = ps[-1] + 1
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
        n_blocks = -(-end // self.block_size)
        plan = self._plan([seq], [list(range(start, end))])
        table = seq.block_table[:n_blocks]
        ctx = AttnContext(pool=self.pool, offset=start, write_plan=plan,
                          block_table=table if self.pool.quant is not None else mx.array(table, dtype=mx.int32),
                          kv_len=end)
        if all_logits:
            return forward(self.model, tokens, ctx)[0]
        return forward(self.model, tokens, ctx, last_only=True)[0, -1]

    def decode(self, seqs: list[Sequence], tokens: mx.array | None = None) -> mx.array:
        """One token for each sequence: the last token of each (at position num_tokens - 1).

        Args:
            tokens: [B] the last tokens when they are still being computed (pipelined decode); else read
                from the sequences.
        Returns:
            logits [B, vocab] (lazy).
        """
        bs = self.block_size
        positions = [s.num_tokens - 1 for s in seqs]
        if tokens is None:
            tokens = mx.array([[s.all_ids[-1]] for s in seqs], dtype=mx.int32)
        else:
            tokens = tokens[:, None]
        ctx = AttnContext(pool=self.pool, offset=mx.array(positions, dtype=mx.int32),
                          write_plan=self._plan(seqs, [[p] for p in positions]))
        if kernel_path() == "reference" or not self.pool.has_kernel:
            ctx.tables = [s.block_table for s in seqs]
            ctx.lens = [p + 1 for p in positions]
        else:
            n_blocks = max(p // bs + 1 for p in positions)
            tables = [s.block_table[:n_blocks] + [0] * (n_blocks - min(n_blocks, len(s.block_table))) for s in seqs]
            ctx.block_tables = mx.array(tables, dtype=mx.int32)
            ctx.context_lens = mx.array([p + 1 for p in positions], dtype=mx.int32)
            ctx.max_len = max(positions) + 1
        return forward(self.model, tokens, ctx)[:, -1, :]
