"""Chooses the attention implementation: ZKV_KERNELS=auto|metal|reference (design.md §4).

auto: the Metal kernels when Metal is available and the default device is the GPU, else the pure-MLX
reference. A variant that fails to build or run falls back to the reference with one warning.
metal: always the Metal kernels (e.g. with the CPU simulator standing in for mx.fast.metal_kernel in
tests); anything that stops them raises KernelError instead of falling back.
reference: always the reference.
"""

from __future__ import annotations

import os
import threading
import warnings

import mlx.core as mx

from ..errors import ConfigError, KernelError
from . import metal
from .kv_format import is_quantized
from .reference import paged_attention_reference
from .reference_quant import paged_attention_reference_quantized
from .window import check_sinks, check_window

_CHOICES = ("auto", "metal", "reference")
_lock = threading.Lock()
_checked: set[tuple[str, object]] = set()  # variants that ran once (the first run is evaluated eagerly)
_failed: set[str] = set()                  # variants that failed in auto mode


def kernel_choice() -> str:
    """The ZKV_KERNELS setting: "auto", "metal" or "reference"."""
    choice = os.environ.get("ZKV_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ConfigError(f"ZKV_KERNELS={choice!r}: use one of {', '.join(_CHOICES)}")
    return choice


def metal_available() -> bool:
    """True when MLX has a Metal back-end and the default device is the GPU."""
    return mx.metal.is_available() and mx.default_device() == mx.gpu


def kernel_path() -> str:
    """Returns the decode attention path in use: "reference" or "metal"."""
    choice = kernel_choice()
    if choice == "auto":
        return "metal" if metal_available() else "reference"
    return choice


def paged_attention(q, k_pool, v_pool, block_tables, context_lens, scale, max_len=None, return_mass=False, *,
                    window=None, sinks=None):
    """Decode attention over the paged pool.

    Args:
        q: [B, n_heads, 1, head_dim].
        k_pool, v_pool: [num_blocks, n_kv_heads, block_size, head_dim] arrays, or `QuantizedPool`s in the
            mx.quantize layout (K and V formats may differ); K may also be a `ChannelKeyPool` (keys per channel
            with their tail and sink rows).
        block_tables: [B, max_blocks] int32; context_lens: [B] int32; scale: softmax scale;
        max_len: max(context_lens) if known (saves a device sync).
        return_mass: also return the attention mass per block-table entry: float32 [B, max_blocks], entry
            [b, j] = the softmax probabilities of entry j's positions (< context_lens[b]) summed over the query
            heads (0 past the sequence's length and before its window; each row sums to n_heads without sinks).
        window: sliding window W for every sequence of the call (each sees its last W positions: mlx-lm's
            RotatingKVCache(max_size=W)); blocks wholly before it are not read. None = full attention.
        sinks: float32 [n_heads] attention-sink logits (gpt-oss), one extra softmax column per query head that
            adds to the denominator and contributes no value; None = none.
    Returns:
        [B, n_heads, 1, head_dim] in q's dtype; with return_mass, (that, mass).
    """
    if kernel_path() == "metal":
        return metal_paged_attention(q, k_pool, v_pool, block_tables, context_lens, scale, max_len, return_mass,
                                     window=window, sinks=sinks)
    return reference_paged_attention(q, k_pool, v_pool, block_tables, context_lens, scale, max_len, return_mass,
                                     window=window, sinks=sinks)


def metal_paged_attention(q, k_pool, v_pool, block_tables, context_lens, scale, max_len=None, return_mass=False,
                          *, window=None, sinks=None):
    """`paged_attention` on the Metal kernels (arguments as there). With ZKV_KERNELS=auto a variant that fails
    to build or run falls back to the reference with one warning; with ZKV_KERNELS=metal it raises KernelError."""
    check_window(window)
    check_sinks(sinks, q.shape[1])
    out = _metal(q, k_pool, v_pool, block_tables, context_lens, scale, max_len, kernel_choice() == "metal",
                 return_mass, window, sinks)
    if out is not None:
        return out
    return reference_paged_attention(q, k_pool, v_pool, block_tables, context_lens, scale, max_len, return_mass,
                                     window=window, sinks=sinks)


def reference_paged_attention(q, k_pool, v_pool, block_tables, context_lens, scale, max_len=None,
                              return_mass=False, *, window=None, sinks=None):
    """`paged_attention` on the pure-MLX reference (arguments as there)."""
    kw = {"window": window, "sinks": sinks}
    if return_mass:  # float pools too: same output as paged_attention_reference, plus the mass
        return paged_attention_reference_quantized(q, k_pool, v_pool, block_tables, context_lens, scale, max_len,
                                                   return_mass=True, **kw)
    if is_quantized(k_pool) or is_quantized(v_pool):
        return paged_attention_reference_quantized(q, k_pool, v_pool, block_tables, context_lens, scale, max_len,
                                                   **kw)
    return paged_attention_reference(q, k_pool, v_pool, block_tables, context_lens, scale, max_len, **kw)


def _metal(q, k_pool, v_pool, block_tables, context_lens, scale, max_len, strict: bool, return_mass: bool = False,
           window=None, sinks=None):
    try:
        var = metal.select_variant(q, k_pool, v_pool, block_tables)
    except metal.Unsupported as e:
        if strict:
            raise KernelError(f"ZKV_KERNELS=metal but no Metal kernel covers this call: {e}") from None
        return None
    if max_len is None:
        max_len = int(context_lens.max().item())
    two_pass = metal.choose_passes(q.shape[0] * q.shape[1], metal.attended_len(max_len, window, var.block_size),
                                   var.block_size)[0]
    variant = var.name(two_pass, return_mass, sinks is not None)  # one/two-pass and mass kernels check and fall back separately
    if variant in _failed:
        return None
    try:
        out = metal.paged_attention_metal(q, k_pool, v_pool, block_tables, context_lens, scale, max_len, two_pass,
                                          return_mass, window=window, sinks=sinks)
        key = (variant, mx.fast.metal_kernel)
        if key not in _checked:
            mx.eval(out)  # on a Mac, compile errors surface at evaluation
            with _lock:
                _checked.add(key)
        return out
    except Exception as e:  # noqa: BLE001 - any failure of a kernel build or run means "use the reference"
        if strict:
            raise KernelError(f"Metal kernel {variant} failed: {e}") from e
        with _lock:
            first = variant not in _failed
            _failed.add(variant)
        if first:
            warnings.warn(f"Metal kernel {variant} failed ({e}); using the reference attention instead",
                          RuntimeWarning, stacklevel=3)
        return None


def reset() -> None:
    """Forgets which variants ran or failed (tests)."""
    with _lock:
        _checked.clear()
        _failed.clear()
