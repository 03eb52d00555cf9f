"""Paged attention wrapped around mlx-lm models (design.md §3, §9).

Each layer's attention module is replaced by `PagedAttention`, which reuses the layer's own projections,
norms and rope, writes the new K/V rows into the pool first and then attends over the pool (`attention.attend`).
The per-step metadata (`attention.PrefillMetadata` / `DecodeMetadata`) is passed where mlx-lm passes a layer
cache, so the model's own forward code is unchanged.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .attention import DecodeMetadata, PrefillMetadata, attend


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

    def __call__(self, x: mx.array, mask=None, cache: PrefillMetadata | DecodeMetadata | None = None) -> mx.array:
        meta = cache
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        # [B, L, H, D] -> [B, H, L, D]
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        q = self.rope(q, offset=meta.positions)
        k = self.rope(k, offset=meta.positions)
        # rows to store: [B*L, H, D] in token order
        k_rows = k.transpose(0, 2, 1, 3).reshape(B * L, self.n_kv_heads, -1)
        v_rows = v.reshape(B * L, self.n_kv_heads, -1)
        meta.pool.write(self.layer_idx, k_rows, v_rows, meta.slot_mapping)
        out = attend(q, self.layer_idx, meta, self.scale)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out)


def install_paged_attention(model: nn.Module) -> int:
    """Replaces every layer's `self_attn` with a PagedAttention; returns the number of layers."""
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if not isinstance(layer.self_attn, PagedAttention):
            layer.self_attn = PagedAttention(layer.self_attn, i)
    return len(layers)


def forward(model: nn.Module, tokens: mx.array, meta: PrefillMetadata | DecodeMetadata, last_only: bool = False) -> mx.array:
    """Runs the model on [B, L] tokens with paged attention.

    Args:
        last_only: compute logits for the last position only (prefill: the vocab projection of every
            prompt position would cost more than the rest of the model).
    Returns:
        logits [B, L or 1, vocab].
    """
    h = model.model(tokens, cache=[meta] * len(model.model.layers))
    if last_only:
        h = h[:, -1:, :]
    if getattr(model, "lm_head", None) is not None:
        return model.lm_head(h)
    return model.model.embed_tokens.as_linear(h)
