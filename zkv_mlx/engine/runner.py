"""Runs the model over the paged pool: prefill chunks one sequence at a time, decode for all sequences at once."""

from __future__ import annotations

import mlx.core as mx

from ..kernels import kernel_path
from ..models.loader import LoadedModel
from ..models.paged import AttnContext, forward, install_paged_attention
from ..storage.kv_pool import KVPool
from .sequence import Sequence


class ModelRunner:
    """Owns the model's forward passes and the KV pool.

    Args:
        lm: the loaded model (its attention modules are replaced by paged ones).
        num_blocks, block_size, kv_dtype: pool geometry.
    """

    def __init__(self, lm: LoadedModel, num_blocks: int, block_size: int, kv_dtype: mx.Dtype):
        self.lm = lm
        self.model = lm.model
        install_paged_attention(self.model)
        self.block_size = block_size
        self.pool = KVPool(lm.n_layers, num_blocks, lm.n_kv_heads, block_size, lm.head_dim, kv_dtype)

    def _slots(self, seq: Sequence, start: int, end: int) -> tuple[mx.array, mx.array]:
        bs = self.block_size
        table = seq.block_table
        blocks = [table[p // bs] for p in range(start, end)]
        offsets = [p % bs for p in range(start, end)]
        return mx.array(blocks, dtype=mx.int32), mx.array(offsets, dtype=mx.int32)

    def prefill(self, seq: Sequence, start: int, end: int) -> mx.array:
        """Computes K/V for tokens [start, end) of the sequence.

        Returns:
            logits [vocab] of the last position (lazy).
        """
        tokens = mx.array(seq.all_ids[start:end], dtype=mx.int32)[None]
        n_blocks = -(-end // self.block_size)
        wb, wo = self._slots(seq, start, end)
        ctx = AttnContext(pool=self.pool, offset=start, write_blocks=wb, write_offsets=wo,
                          block_table=mx.array(seq.block_table[:n_blocks], dtype=mx.int32), kv_len=end)
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
        ctx = AttnContext(
            pool=self.pool,
            offset=mx.array(positions, dtype=mx.int32),
            write_blocks=mx.array([s.block_table[p // bs] for s, p in zip(seqs, positions)], dtype=mx.int32),
            write_offsets=mx.array([p % bs for p in positions], dtype=mx.int32),
        )
        if kernel_path() == "reference":
            ctx.tables = [s.block_table for s in seqs]
            ctx.lens = [p + 1 for p in positions]
        else:
            n_blocks = max(p // bs + 1 for p in positions)
            tables = [s.block_table[:n_blocks] + [0] * (n_blocks - min(n_blocks, len(s.block_table))) for s in seqs]
            ctx.block_tables = mx.array(tables, dtype=mx.int32)
            ctx.context_lens = mx.array([p + 1 for p in positions], dtype=mx.int32)
            ctx.max_len = max(positions) + 1
        return forward(self.model, tokens, ctx)[:, -1, :]
