"""Routes mlx-lm's attention call to the engine for layers whose cache is the engine's.

mlx-lm's model files import `scaled_dot_product_attention` from `mlx_lm/models/base.py` by name (one binding per
module); `install()` rebinds it in every loaded mlx-lm model module to `scaled_dot_product_attention` below, which
hands the call to the cache when the cache is a `HookedCache` (the engine's paged caches, the load-time probe) and
otherwise calls mlx-lm's own function unchanged, so mlx-lm's own generation keeps working in the same process.
"""

from __future__ import annotations

import sys


class HookedCache:
    """Base of the caches that take over the attention call (`sdpa`)."""

    __slots__ = ()
    # mlx-lm's pipeline forwards tie their send to the last layer's cache (`cache[-1].keys = mx.depends(...)`):
    # set by distributed/load.py in pipeline runs, where the caches below then accept that tie
    pipeline_tie = False

    def sdpa(self, orig, queries, keys, values, scale, mask, sinks):  # pragma: no cover - interface
        raise NotImplementedError


def _original():
    from mlx_lm.models import base

    return base.scaled_dot_product_attention


def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's `base.scaled_dot_product_attention` signature; the engine's caches attend themselves."""
    if isinstance(cache, HookedCache):
        return cache.sdpa(_ORIG[0], queries, keys, values, scale, mask, sinks)
    return _ORIG[0](queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


_ORIG: list = []


def install() -> int:
    """Rebinds the attention function in every loaded mlx-lm model module; returns how many were rebound."""
    if not _ORIG:
        _ORIG.append(_original())
    n = 0
    for name, mod in list(sys.modules.items()):
        if name.startswith("mlx_lm.models.") and getattr(mod, "scaled_dot_product_attention", None) is _ORIG[0]:
            if name != "mlx_lm.models.base":
                mod.scaled_dot_product_attention = scaled_dot_product_attention
                n += 1
    return n
