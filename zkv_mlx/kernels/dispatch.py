"""Chooses the attention implementation: ZKV_KERNELS=auto|metal|reference (design.md §4).

Until the Metal kernels land (metal/), every path resolves to the pure-MLX reference.
"""

from __future__ import annotations

import os

from ..errors import ConfigError
from .reference import paged_attention_reference

_CHOICES = ("auto", "metal", "reference")


def kernel_path() -> str:
    """Returns the decode attention path in use: "reference" or "metal", with the reason."""
    choice = os.environ.get("ZKV_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ConfigError(f"ZKV_KERNELS={choice!r}: use one of {', '.join(_CHOICES)}")
    return "reference"


def paged_attention(q, k_pool, v_pool, block_tables, context_lens, scale, max_len=None):
    """Decode attention over the paged pool; see `paged_attention_reference` for shapes."""
    return paged_attention_reference(q, k_pool, v_pool, block_tables, context_lens, scale, max_len)
