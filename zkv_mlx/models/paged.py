"""Paged attention attached to any mlx-lm model through mlx-lm's own cache protocol (design.md §3, §9).

The model's own code runs unchanged: for each forward pass the engine hands it, in `make_cache()`'s structure, a
`PagedCache` per attention slot (speaking `offset`, `update_and_fetch`, `make_mask`) and each sequence's own
mlx-lm cache objects for state layers (SSM / linear attention) and unpaged slots. `update_and_fetch` writes the new
K/V rows into the pool (write first, then attend); the attention call, routed here by `sdpa_hook`, attends over
the pool (`attention.attend`). Slots whose model code uses the fetched K/V itself (`KVSlot.dense`) get the
sequence's K/V gathered from the pool and the mask mlx-lm's own cache would give.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import mlx.nn as nn

from ..kernels.dispatch import metal_available
from . import fused_norm, sdpa_hook, step_rope
from .attention import DecodeMetadata, PrefillMetadata, attend
from .layer_plan import KVSlot, LayerPlan, build_plan


class PagedCache(sdpa_hook.HookedCache):
    """One attention slot's view of the pool for one forward pass (mlx-lm's cache protocol)."""

    __slots__ = ("meta", "slot")

    def __init__(self, meta: PrefillMetadata | DecodeMetadata, slot: KVSlot):
        self.meta, self.slot = meta, slot

    @property
    def offset(self):
        """Rope offset: the first new token's position (prefill, int) or each sequence's (decode, int32 [B])."""
        return self.meta.offset

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        # Paged attention masks by context length and window itself; dense slots get mlx-lm's own mask.
        if self.slot.dense or return_array:
            return _dense_mask(self.meta, self.slot, N, return_array, window_size)
        return "causal" if N > 1 else None

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Writes the new rows ([B, n_kv_heads, L, head_dim] each, rotated) into the pool; returns K/V for the
        attention call: the same arrays (paged) or the sequence's K/V gathered from the pool (dense)."""
        B, H, L, _ = keys.shape
        meta = self.meta
        # [B, H, L, D] -> [B*L, H, D] rows in token order (one token: the same memory order, no transpose op)
        if L == 1:
            k_rows, v_rows = keys.reshape(B, H, -1), values.reshape(B, H, -1)
        else:
            k_rows = keys.transpose(0, 2, 1, 3).reshape(B * L, H, -1)
            v_rows = values.transpose(0, 2, 1, 3).reshape(B * L, H, -1)
        meta.pool.write(self.slot.index, k_rows, v_rows, meta.slot_mapping)
        if not self.slot.dense:
            return keys, values
        lo, n, table = _dense_range(meta, self.slot, L)
        k, v = meta.pool.gather(self.slot.index, table, n)
        return k[:, :, lo:].astype(keys.dtype), v[:, :, lo:].astype(values.dtype)

    # mlx-lm's pipeline forwards (models/pipeline.py users) tie their send to the last layer's cache with
    # `cache[-1].keys = mx.depends(cache[-1].keys, h)`; our logits depend on that send already (through the
    # all_gather after it), so the tie is accepted and dropped. Only in pipeline runs (`pipeline_tie`, set by
    # distributed/load.py): elsewhere a PagedCache has no `keys`, as before.
    @property
    def keys(self) -> mx.array:
        if not self.pipeline_tie:
            raise AttributeError("keys")
        return mx.zeros((1,), dtype=mx.float32)

    @keys.setter
    def keys(self, value) -> None:
        pass

    def sdpa(self, orig, queries, keys, values, scale, mask, sinks):
        if self.slot.dense:
            return orig(queries, keys, values, cache=None, scale=scale, mask=mask, sinks=sinks)
        out = attend(queries, self.slot.index, self.meta, scale, window=self.slot.window, sinks=sinks)
        return out.astype(queries.dtype)


def _dense_range(meta, slot: KVSlot, L: int):
    """(first row to keep, rows to gather, block table): what mlx-lm's own cache would hand back (B = 1)."""
    if meta.is_prefill:
        n, table = meta.context_len, meta.block_table
    else:
        n, table = meta.context_lens[0], meta.block_tables[0]
    start = n - L
    if slot.window is None:
        return 0, n, table
    # RotatingKVCache keeps W - 1 earlier rows plus the new ones during prefill, the last W during decode
    keep = slot.window - 1 if L > 1 else slot.window - L
    return max(0, start - keep), n, table


def _dense_mask(meta, slot: KVSlot, N: int, return_array: bool, window_size):
    from mlx_lm.models.cache import create_attention_mask

    n = meta.context_len if meta.is_prefill else meta.context_lens[0]
    start = n - N
    if slot.window is None:
        return create_attention_mask(N, start, return_array, window_size)
    from mlx_lm.models.base import create_causal_mask

    window = window_size or slot.window
    if N > 1:
        off = min(slot.window - 1, start)
        return create_causal_mask(N, off, window_size=window) if (off + N > window or return_array) else "causal"
    return None


def attach(model: nn.Module) -> LayerPlan:
    """Prepares a loaded mlx-lm model for the engine: derives its layer plan (`layer_plan.build_plan`), routes
    its attention calls (`sdpa_hook.install`), lets prefill compute the last position's logits only and
    on the CPU backend rotates decode steps' rows from one rope table per step (`step_rope.install`) and
    normalizes them with one compiled RMSNorm (`fused_norm.install`: only inside `forward`, so the model still
    runs as mlx-lm's own elsewhere); on the GPU mx.fast's Metal kernels stay.

    Raises:
        ModelLoadError: the model needs something the engine does not implement (named in the message).
    """
    plan = build_plan(model)
    plan.last_only = _install_last_only(model)
    if not metal_available():
        # The CPU backend has no rope / rms_norm kernels (each call runs mx.fast's fallback graph of small ops);
        # on the GPU `mx.fast.rope` and `mx.fast.rms_norm` are single Metal kernels: keep them.
        step_rope.install(model)
        fused_norm.install(model)
    return plan


class _Flag(threading.local):
    last_only = False  # per thread: another thread's forward of the same model (a second engine) is unaffected


_LAST = _Flag()


def _install_last_only(model: nn.Module) -> bool:
    """Makes the model's inner module (the one holding the layers) return only its last position while
    `_LAST.last_only` is set, so the model's own head, soft-capping and scaling run on one position.
    Verified on a probe: returns False (full logits, sliced afterwards) when the model does not fit the pattern."""
    from mlx_lm.models.cache import make_prompt_cache

    inner_name = next((k for k, v in model.children().items() if isinstance(v, nn.Module) and hasattr(v, "layers")),
                      None)
    if inner_name is None:
        return False
    inner = getattr(model, inner_name)
    cls = type(inner)
    if not getattr(cls, "_zkv_last_only", False):
        def call(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            return out[:, -1:] if _LAST.last_only and isinstance(out, mx.array) and out.ndim == 3 else out

        inner.__class__ = type(cls.__name__, (cls,), {"__call__": call, "_zkv_last_only": True})
    tokens = mx.array([[5, 9, 2, 7]], dtype=mx.int32)
    try:
        full = model(tokens, cache=make_prompt_cache(model))
        _LAST.last_only = True
        last = model(tokens, cache=make_prompt_cache(model))
    except Exception:  # noqa: BLE001 -- the pattern does not fit this model: use full logits
        return False
    finally:
        _LAST.last_only = False
    return last.shape[1] == 1 and bool(mx.allclose(last[:, 0], full[:, -1], atol=1e-4, rtol=1e-4).item())


def build_caches(plan: LayerPlan, meta, states: list) -> list:
    """The cache list for one forward pass: PagedCache per paged slot, `states[i]` for state/unpaged slot i.

    meta: one metadata for every paged slot, or a dict window -> metadata (None: full attention) when window
        slots have their own pools (engine/window_groups.py).
    """
    def build(t):
        kind, x = t
        if kind == "list":
            from mlx_lm.models.cache import CacheList

            return CacheList(*(build(c) for c in x))
        if kind == "state":
            return states[x]
        if not x.paged:
            return states[x.index]
        return PagedCache(meta[x.window] if isinstance(meta, dict) else meta, x)

    return [build(t) for t in plan.template]


def new_states(model: nn.Module, plan: LayerPlan) -> list:
    """Fresh per-sequence caches of the model's state and unpaged slots (in plan index order)."""
    if not plan.n_state:
        return []
    from mlx_lm.models.cache import make_prompt_cache

    out: list = []

    def walk(t, c):
        kind, x = t
        if kind == "list":
            for tt, cc in zip(x, c.caches):
                walk(tt, cc)
        elif kind == "state" or not x.paged:
            out.append(c)

    for t, c in zip(plan.template, make_prompt_cache(model)):
        walk(t, c)
    return out


def forward(model: nn.Module, plan: LayerPlan, tokens: mx.array, meta, states: list,
            last_only: bool = False) -> mx.array:
    """Runs the model's own forward on [B, L] tokens with paged attention.

    Args:
        states: the state/unpaged caches of the batch (one list; B = 1, or merged along the batch axis).
        last_only: logits of the last position only (prefill: the head over every prompt position would cost
            more than the rest of the model).
    Returns:
        logits [B, L or 1, vocab].
    """
    caches = build_caches(plan, meta, states)
    with fused_norm.paged_forward():
        if last_only and plan.last_only:
            _LAST.last_only = True
            try:
                return model(tokens, cache=caches)
            finally:
                _LAST.last_only = False
        out = model(tokens, cache=caches)
    return out[:, -1:] if last_only else out
