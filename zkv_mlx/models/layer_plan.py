"""The layer plan: what each of a model's cache slots is, derived from the model itself (design.md §9, models.md).

`model.make_cache()` (mlx-lm's own declaration; one `KVCache` per layer when a model has none) gives each slot's
kind: `KVCache` -> a paged full-attention slot, `RotatingKVCache(max_size=W)` -> a paged sliding-window slot of
window W, `ArraysCache` (SSM / linear-attention state) -> a per-sequence state slot kept as mlx-lm's own object,
`CacheList` -> its parts. A probe forward over a few tokens, run through mlx-lm's own caches with instrumented
wrappers, finds per slot its K/V geometry and whether the model's code uses the fetched K/V other than by passing
them to `scaled_dot_product_attention` (such slots get dense K/V gathered from the pool). Anything the engine
does not implement raises `ModelLoadError` naming it: never a silently different decode.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ..errors import ModelLoadError
from . import sdpa_hook

# Probe prompt length: long enough for a multi-token mask and a few decode steps of the state layers.
PROBE_TOKENS = 6


@dataclass(slots=True, frozen=True)
class KVSlot:
    """One attention cache slot of the model, in `make_cache()` order.

    index: its layer index in the KV pool (paged slots) or in the sequence's own caches (unpaged slots).
    window: sliding window W (the query at cache index i sees (i - W, i]) or None for full attention.
    dense: the model uses the fetched K/V itself (own softmax, MLA, ...): update_and_fetch returns them gathered.
    paged: False when the slot's geometry differs from the pool's (e.g. MLA's K and V head dims): it keeps
        mlx-lm's own cache per sequence (not paged, not shared by the prefix cache yet).
    """

    index: int
    window: int | None
    dense: bool
    paged: bool
    n_kv_heads: int
    k_head_dim: int
    v_head_dim: int


@dataclass(slots=True)
class LayerPlan:
    """Per cache slot of a model: its kind and geometry, plus how the model is called.

    template: `make_cache()`'s structure with leaves replaced by ("kv", KVSlot) / ("state", i) tuples and
        `CacheList`s kept as ("list", [children]).
    n_kv_heads, head_dim, kv_dtype: the geometry of the paged slots (the pool's).
    n_state: per-sequence state caches (SSM / linear attention) and unpaged KV caches.
    sinks: some slot passes attention-sink logits (gpt-oss).
    last_only: the model's inner module can be cut to its last position before the head (prefill logits).
    vocab_size: logits width.
    """

    template: list
    slots: list[KVSlot]
    n_kv_heads: int
    head_dim: int
    kv_dtype: mx.Dtype
    n_state: int
    sinks: bool
    vocab_size: int
    last_only: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def paged_slots(self) -> list[KVSlot]:
        return [s for s in self.slots if s.paged]

    @property
    def has_state(self) -> bool:
        """Sequences carry per-sequence caches (state layers or unpaged KV) besides their blocks."""
        return self.n_state > 0

    @property
    def windows(self) -> list[int]:
        return sorted({s.window for s in self.paged_slots if s.window is not None})

    def groups(self) -> list[dict]:
        """Slots grouped by kind (for `doctor` and `kv_cache_stats`): kind, window, slots, heads, head dim."""
        out: dict = {}
        for s in self.slots:
            kind = ("window" if s.window else "full") if s.paged else "unpaged"
            key = (kind, s.window, s.dense, s.n_kv_heads, s.k_head_dim, s.v_head_dim)
            out.setdefault(key, []).append(s.index)
        groups = [dict(kind=k[0], window=k[1], dense=k[2], n_kv_heads=k[3], k_head_dim=k[4], v_head_dim=k[5],
                       slots=len(v)) for k, v in out.items()]
        if self.n_state_layers:
            groups.append(dict(kind="state", window=None, dense=False, n_kv_heads=0, k_head_dim=0, v_head_dim=0,
                               slots=self.n_state_layers))
        return groups

    @property
    def n_state_layers(self) -> int:
        """Recurrent-state caches (SSM / linear attention), unpaged KV slots not counted."""
        return self.n_state - sum(1 for s in self.slots if not s.paged)


def describe(plan: LayerPlan, kv_dtype: mx.Dtype) -> dict:
    """The plan as `zkv-mlx doctor --model` prints it: per group kind, window, slots, heads, head dims and KV bytes
    per token (`kv_dtype` storage; K and V of every slot of the group), plus notes."""
    groups = []
    for g in plan.groups():
        per_token = g["slots"] * g["n_kv_heads"] * (g["k_head_dim"] + g["v_head_dim"]) * kv_dtype.size
        groups.append(dict(g, kv_bytes_per_token=per_token))
    notes = list(plan.notes)
    if any(g["dense"] for g in plan.groups()):
        notes.append("some layers use their fetched K/V themselves (own softmax, soft-capping, ...): they get dense "
                     "K/V gathered from the pool and decode one sequence at a time")
    if plan.n_state_layers:
        notes.append("state layers (SSM / linear attention) are kept per sequence; prefix hits resume them from "
                     "snapshots at block boundaries")
    return {"groups": groups, "sinks": plan.sinks, "vocab_size": plan.vocab_size, "notes": notes}


def make_template(model: nn.Module) -> list:
    """`make_cache()` with each leaf classified; raises ModelLoadError for cache kinds the engine lacks."""
    from mlx_lm.models import cache as C

    caches = model.make_cache() if hasattr(model, "make_cache") else [C.KVCache() for _ in model.layers]

    def leaf(c):
        if type(c) is C.CacheList:
            return ("list", [leaf(x) for x in c.caches])
        if type(c) is C.KVCache:
            return ("kv", None)
        if type(c) is C.RotatingKVCache:
            if c.keep:
                raise ModelLoadError(f"{_name(model)}: a sliding-window cache that keeps its first {c.keep} tokens "
                                     "(RotatingKVCache keep > 0) is not implemented; use mlx-lm for this model")
            return ("window", c.max_size)
        if isinstance(c, C.ArraysCache):
            return ("state", None)
        raise ModelLoadError(f"{_name(model)}: layer cache {type(c).__name__} (e.g. chunked attention) is not "
                             "implemented by zkv-mlx; use mlx-lm for this model")

    return [leaf(c) for c in caches]


def _refuse_unreproducible(model: nn.Module) -> None:
    """Model features whose result depends on how a prompt is split into forward calls: a paged engine (chunked
    prefill, prefix hits, batched decode) cannot reproduce them, so they are refused rather than decoded differently."""
    from mlx_lm.models import rope_utils

    for _, m in model.named_modules():
        if isinstance(m, rope_utils.DynamicNTKScalingRoPE):
            raise ModelLoadError(f"{_name(model)}: dynamic NTK rope scaling (rope_scaling type 'dynamic') takes its "
                                 "base from each call's length, so its output depends on how the prompt is split; "
                                 "not implemented -- use mlx-lm for this model or a config with another rope scaling")


def _name(model) -> str:
    return getattr(getattr(model, "args", None), "model_type", None) or type(model).__module__.split(".")[-1]


class _ProbeCache(sdpa_hook.HookedCache):
    """Wraps one of mlx-lm's own KV caches: computes exactly what mlx-lm computes, but hands the model NaN-poisoned
    copies of the fetched K/V and records what reaches `scaled_dot_product_attention`."""

    def __init__(self, inner, poison: bool, masks: list):
        self.inner, self.poison = inner, poison
        self.window = getattr(inner, "max_size", None)
        self.fetched = None  # (poisoned keys, poisoned values) as handed out
        self.real = None
        self.masks = masks  # (mask, window) made by every probe of this forward (models share one mask)
        self.k_shape = self.v_shape = self.dtype = None
        self.own_softmax = False  # fetched K/V reached our sdpa untouched?
        self.seen_sdpa = False
        self.window_request = None
        self.sinks = False

    @property
    def offset(self):
        return self.inner.offset

    @property
    def keys(self):  # pipeline runs only: the send tie of mlx-lm's pipeline forwards (sdpa_hook.HookedCache)
        if not self.pipeline_tie:
            raise AttributeError("keys")
        return self.inner.keys

    @keys.setter
    def keys(self, value) -> None:
        self.inner.keys = value

    def make_mask(self, N, return_array=False, window_size=None):
        m = self.inner.make_mask(N, return_array=return_array, window_size=window_size)
        if window_size is not None and window_size != self.window:
            self.window_request = window_size
        self.masks.append((m, window_size or self.window))
        return m

    def update_and_fetch(self, keys, values):
        k, v = self.inner.update_and_fetch(keys, values)
        self.k_shape, self.v_shape, self.dtype = keys.shape, values.shape, keys.dtype
        self.real = (k, v)
        if self.poison:
            nan = mx.array(math.nan, dtype=k.dtype)
            self.fetched = (k + nan, v + nan)
        else:
            self.fetched = (k, v)
        return self.fetched

    def sdpa(self, orig, queries, keys, values, scale, mask, sinks):
        self.seen_sdpa = True
        self.sinks = self.sinks or sinks is not None
        if self.fetched is None or keys is not self.fetched[0] or values is not self.fetched[1]:
            self.own_softmax = True  # K/V changed between fetch and attention: dense
        if not (mask is None or isinstance(mask, str) or any(mask is m and w == self.window for m, w in self.masks)):
            self.own_softmax = True  # a mask of the model's own making: dense
        # untouched fetched K/V: attend over the real ones; else the model's own (poisoned-derived) arrays
        k, v = self.real if not self.own_softmax else (keys, values)
        return orig(queries, k, v, cache=None, scale=scale, mask=mask, sinks=sinks)


def _wrap(template, real, poison: bool, probes: list, masks: list | None = None) -> list:
    masks = [] if masks is None else masks
    out = []
    for t, c in zip(template, real):
        if t[0] == "list":
            from mlx_lm.models.cache import CacheList

            out.append(CacheList(*_wrap(t[1], c.caches, poison, probes, masks)))
        elif t[0] in ("kv", "window"):
            p = _ProbeCache(c, poison, masks)
            probes.append(p)
            out.append(p)
        else:
            out.append(c)
    return out


def _probe(model, template, poison: bool):
    from mlx_lm.models import cache as C

    real = model.make_cache() if hasattr(model, "make_cache") else [C.KVCache() for _ in model.layers]
    probes: list = []
    caches = _wrap(template, real, poison, probes)
    tokens = mx.array([[1 + (i * 7) % 50 for i in range(PROBE_TOKENS)]], dtype=mx.int32)
    logits = model(tokens, cache=caches)
    step = model(mx.array([[3]], dtype=mx.int32), cache=caches)
    mx.eval(logits, step)
    return probes, logits, step


def build_plan(model: nn.Module) -> LayerPlan:
    """Derives the layer plan of a loaded mlx-lm model (a few tiny probe forwards).

    Raises:
        ModelLoadError: a cache kind, mask or attention use the engine does not implement, or a model without
            any attention layer to page.
    """
    template = make_template(model)
    _refuse_unreproducible(model)
    sdpa_hook.install()
    try:
        probes, logits, step = _probe(model, template, poison=True)
    except Exception as e:  # noqa: BLE001 -- any failure of the model's own code is a load error
        raise ModelLoadError(f"{_name(model)}: the model fails its probe forward ({type(e).__name__}: {e})") from None
    poisoned = bool(mx.any(mx.isnan(logits)).item() or mx.any(mx.isnan(step)).item())
    if not probes:
        raise ModelLoadError(f"{_name(model)}: the model has no attention layers to page (pure SSM/RNN); "
                             "use mlx-lm for this model")
    for p in probes:
        if p.window_request is not None:
            raise ModelLoadError(f"{_name(model)}: a layer asks for an attention window ({p.window_request}) that its "
                                 "cache does not declare; not implemented, use mlx-lm for this model")
        if not p.seen_sdpa:
            p.own_softmax = True  # attends by itself (e.g. mx.fast directly, or its own softmax)
    if poisoned:
        # Some layer uses its fetched K/V outside the attention call: find which, one slot at a time.
        flags = _locate_poison(model, template, len(probes))
        for p, f in zip(probes, flags):
            p.own_softmax = p.own_softmax or f
    return _assemble(model, template, probes, logits)


def _locate_poison(model, template, n: int) -> list[bool]:
    flags = []
    for i in range(n):
        probes, logits, step = _probe_one(model, template, i)
        flags.append(bool(mx.any(mx.isnan(logits)).item() or mx.any(mx.isnan(step)).item()))
    return flags


def _probe_one(model, template, target: int):
    from mlx_lm.models import cache as C

    real = model.make_cache() if hasattr(model, "make_cache") else [C.KVCache() for _ in model.layers]
    probes: list = []
    caches = _wrap(template, real, False, probes)
    probes[target].poison = True
    tokens = mx.array([[1 + (i * 7) % 50 for i in range(PROBE_TOKENS)]], dtype=mx.int32)
    logits = model(tokens, cache=caches)
    step = model(mx.array([[3]], dtype=mx.int32), cache=caches)
    mx.eval(logits, step)
    return probes, logits, step


def _assemble(model, template, probes, logits) -> LayerPlan:
    geoms = Counter((p.k_shape[1], p.k_shape[3]) for p in probes if p.k_shape[3] == p.v_shape[3]
                    and p.k_shape[1] == p.v_shape[1])
    if not geoms:
        heads, dim = probes[0].k_shape[1], probes[0].k_shape[3]
    else:
        (heads, dim), _ = geoms.most_common(1)[0]
    it = iter(probes)
    slots: list[KVSlot] = []
    counters = {"paged": 0, "state": 0}
    notes: list[str] = []

    def assign(t):
        if t[0] == "list":
            return ("list", [assign(x) for x in t[1]])
        if t[0] == "state":
            counters["state"] += 1
            return ("state", counters["state"] - 1)
        p = next(it)
        window = t[1] if t[0] == "window" else None
        fits = (p.k_shape[1], p.k_shape[3]) == (heads, dim) and p.v_shape[1:2] + p.v_shape[3:] == (heads, dim)
        if fits:
            slot = KVSlot(counters["paged"], window, p.own_softmax, True, heads, dim, dim)
            counters["paged"] += 1
        else:
            slot = KVSlot(counters["state"], window, True, False, p.k_shape[1], p.k_shape[3], p.v_shape[3])
            counters["state"] += 1
        slots.append(slot)
        return ("kv", slot)

    new_template = [assign(t) for t in template]
    unpaged = [s for s in slots if not s.paged]
    if unpaged:
        notes.append(f"{len(unpaged)} attention layer(s) keep mlx-lm's own KV per sequence (K/V geometry "
                     f"{unpaged[0].n_kv_heads}x{unpaged[0].k_head_dim}/{unpaged[0].v_head_dim} differs from the "
                     "pool's): their KV is not paged or compressed yet")
    return LayerPlan(template=new_template, slots=slots, n_kv_heads=heads, head_dim=dim,
                     kv_dtype=probes[0].dtype, n_state=counters["state"], sinks=any(p.sinks for p in probes),
                     vocab_size=int(logits.shape[-1]), notes=notes)
