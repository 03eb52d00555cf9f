"""Paged attention wrapped around mlx-lm models (design.md §3, §9).

Each layer's attention module is replaced by `PagedAttention`, which reuses the layer's own projections,
norms and rope, writes the new K/V rows into the pool first and then attends over the pool. The per-step
`AttnContext` is passed where mlx-lm passes a layer cache, so the model's own forward code is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..kernels import paged_attention, prefill_attention_reference
from ..kernels.reference import grouped_decode_attention, single_decode_attention
from ..storage.kv_pool import KVPool


@dataclass(slots=True)
class AttnContext:
    """What the attention modules need for one forward call.

    Prefill (B=1, L new tokens): `offset` int, `block_table` [nb] of the sequence, `kv_len` = offset + L.
    Decode (B sequences, 1 token each): `offset` [B] positions, `block_tables` [B, nb], `context_lens` [B].
    Both: `write_blocks`/`write_offsets` [N] where the N new rows go, or `write_plan` (quantized pools).
    """

    pool: KVPool
    offset: int | mx.array
    write_blocks: mx.array | None = None
    write_offsets: mx.array | None = None
    write_plan: object = None  # storage.kv_pool.WritePlan
    block_table: mx.array | None = None
    kv_len: int = 0
    block_tables: mx.array | None = None
    context_lens: mx.array | None = None
    max_len: int = 0
    tables: list[list[int]] | None = None  # decode on the reference path: per-sequence python tables
    lens: list[int] | None = None
    mass: list[list] | None = None  # h2o: per sequence, each layer's attention mass per block-table index
    groups: list | None = None  # decode, reference path: [(member indices, tables [G, nb], lens [G])]
    plans: list | None = None  # decode, reference path: per sequence `decode_plan` (None for grouped ones)

    @property
    def is_prefill(self) -> bool:
        return self.block_tables is None and self.tables is None

    def make_mask(self, *args, **kwargs):
        # mlx-lm asks the cache for a mask; PagedAttention builds its own.
        return None


class PagedAttention(nn.Module):
    """Attention that keeps K/V in the paged pool. Wraps an mlx-lm llama/qwen2/qwen3 Attention."""

    def __init__(self, attn: nn.Module, layer_idx: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        if hasattr(attn, "q_norm"):
            self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.rope = attn.rope
        self.n_heads = attn.n_heads
        self.n_kv_heads = attn.n_kv_heads
        self.scale = attn.scale
        self.layer_idx = layer_idx

    def __call__(self, x: mx.array, mask=None, cache: AttnContext | None = None) -> mx.array:
        ctx = cache
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        # [B, L, H, D] -> [B, H, L, D]
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        q = self.rope(q, offset=ctx.offset)
        k = self.rope(k, offset=ctx.offset)
        # rows to store: [B*L, H, D] in token order
        k_rows = k.transpose(0, 2, 1, 3).reshape(B * L, self.n_kv_heads, -1)
        v_rows = v.reshape(B * L, self.n_kv_heads, -1)
        if ctx.write_plan is not None:
            ctx.pool.write(self.layer_idx, k_rows, v_rows, ctx.write_plan)
        else:
            ctx.pool.write(self.layer_idx, k_rows, v_rows, ctx.write_blocks, ctx.write_offsets)
        if ctx.is_prefill:
            keys, values = ctx.pool.gather(self.layer_idx, ctx.block_table, ctx.kv_len)
            if ctx.mass is not None:
                per_pos: list = []
                out = prefill_attention_reference(q, keys, values, self.scale, mass_out=per_pos)
                bs = ctx.pool.block_size
                nb = -(-ctx.kv_len // bs)
                ctx.mass[0].append(mx.pad(per_pos[0], (0, nb * bs - ctx.kv_len)).reshape(nb, bs).sum(axis=1))
            else:
                out = prefill_attention_reference(q, keys, values, self.scale)
        elif ctx.tables is not None and ctx.pool.quant is not None:
            # Quantized reference path: each sequence's own blocks, read quantized (or dequantized where
            # mx.quantized_matmul does not take the group size, e.g. tiny test models).
            outs = []
            for i, (t, n) in enumerate(zip(ctx.tables, ctx.lens)):
                if ctx.pool.reads_quantized:  # straight from the packed blocks (mx.quantized_matmul)
                    outs.append(ctx.pool.decode_attention(self.layer_idx, q[i : i + 1], t, n, self.scale))
                    continue
                keys, values = ctx.pool.gather(self.layer_idx, t, n)
                outs.append(prefill_attention_reference(q[i : i + 1], keys, values, self.scale))
            out = outs[0] if B == 1 else mx.concatenate(outs, axis=0)
        elif ctx.tables is not None:
            # Reference path: short sequences in groups of equal block count (one batched graph per group), long
            # ones alone; either way a sequence's result does not depend on the rest of the batch, so batched
            # decode is bitwise equal to solo decode.
            kp, vp = ctx.pool.k[self.layer_idx], ctx.pool.v[self.layer_idx]
            outs: list = [None] * B
            for members, tables, lens in ctx.groups or ():
                if len(members) == B:  # the whole batch in one group
                    out = grouped_decode_attention(q, kp, vp, tables, lens, self.scale)
                    break
                o = grouped_decode_attention(q[mx.array(members, dtype=mx.int32)], kp, vp, tables, lens, self.scale)
                for j, i in enumerate(members):
                    outs[i] = o[j : j + 1]
            else:
                for i, (t, n) in enumerate(zip(ctx.tables, ctx.lens)):
                    if outs[i] is None:
                        outs[i] = single_decode_attention(q if B == 1 else q[i : i + 1], kp, vp, t, n, self.scale,
                                                          None if ctx.mass is None else ctx.mass[i],
                                                          ctx.plans[i] if ctx.plans else None)
                out = outs[0] if B == 1 else mx.concatenate(outs, axis=0)
        elif ctx.mass is not None:
            out, mass = paged_attention(q, ctx.pool.k_pool(self.layer_idx), ctx.pool.v_pool(self.layer_idx),
                                        ctx.block_tables, ctx.context_lens, self.scale, ctx.max_len,
                                        return_mass=True)
            bs = ctx.pool.block_size
            for i, parts in enumerate(ctx.mass):
                parts.append(mass[i, : -(-ctx.lens[i] // bs)])
        else:
            out = paged_attention(q, ctx.pool.k_pool(self.layer_idx), ctx.pool.v_pool(self.layer_idx),
                                  ctx.block_tables, ctx.context_lens, self.scale, ctx.max_len)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out)


def install_paged_attention(model: nn.Module) -> int:
    """Replaces every layer's `self_attn` with a PagedAttention; returns the number of layers."""
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if not isinstance(layer.self_attn, PagedAttention):
            layer.self_attn = PagedAttention(layer.self_attn, i)
    return len(layers)


def forward(model: nn.Module, tokens: mx.array, ctx: AttnContext, last_only: bool = False) -> mx.array:
    """Runs the model on [B, L] tokens with paged attention.

    Args:
        last_only: compute logits for the last position only (prefill: the vocab projection of every
            prompt position would cost more than the rest of the model).
    Returns:
        logits [B, L or 1, vocab].
    """
    h = model.model(tokens, cache=[ctx] * len(model.model.layers))
    if last_only:
        h = h[:, -1:, :]
    if getattr(model, "lm_head", None) is not None:
        return model.lm_head(h)
    return model.model.embed_tokens.as_linear(h)
