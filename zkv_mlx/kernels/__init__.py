"""Attention over the paged KV pool: pure-MLX reference and the dispatcher (Metal kernels plug in here)."""

from .dispatch import kernel_path, paged_attention
from .reference import paged_attention_reference, prefill_attention_reference

__all__ = ["paged_attention", "paged_attention_reference", "prefill_attention_reference", "kernel_path"]
