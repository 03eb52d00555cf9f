"""Attention over the paged KV pool: pure-MLX reference, Metal kernels and the dispatcher between them."""

from .dispatch import kernel_path, paged_attention
from .kv_format import QuantizedPool, quantize_pool
from .reference import paged_attention_reference, prefill_attention_reference
from .reference_quant import paged_attention_reference_quantized

__all__ = ["QuantizedPool", "kernel_path", "paged_attention", "paged_attention_reference",
           "paged_attention_reference_quantized", "prefill_attention_reference", "quantize_pool"]
