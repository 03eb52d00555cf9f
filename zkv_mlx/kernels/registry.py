"""The Metal kernels of metal/, built through `mx.fast.metal_kernel` once each (design.md §4).

Sources are read as package resources of `zkv_mlx.metal` (the repo's metal/ dir), so they ship in the
wheel. `mx.fast.metal_kernel` is looked up when a kernel is built, never bound at import, so tests can
put the CPU simulator in its place; a kernel built by another factory is rebuilt.
"""

from __future__ import annotations

import importlib.resources
import threading
from functools import lru_cache

import mlx.core as mx

_MARK = "//// kernel: "
_ATTN_INPUTS = ["q", "k", "k_scales", "k_biases", "v", "v_scales", "v_biases", "block_tables", "context_lens",
                "scale"]

# kernel -> (file, header, input names, output names)
KERNELS: dict[str, tuple[str, str, list[str], list[str]]] = {
    "paged_attention_1pass": ("paged_attention.metal", "paged_common.h", _ATTN_INPUTS, ["out"]),
    "paged_attention_2pass_partial": ("paged_attention.metal", "paged_common.h", _ATTN_INPUTS + ["partition"],
                                      ["o_part", "ml"]),
    "paged_attention_2pass_reduce": ("paged_attention.metal", "paged_common.h", ["o_part", "ml"], ["out"]),
}

_lock = threading.Lock()
_built: dict[str, tuple[object, object]] = {}  # kernel -> (factory, kernel object)


def read_metal(filename: str) -> str:
    """Text of a file shipped in zkv_mlx.metal."""
    return importlib.resources.files("zkv_mlx.metal").joinpath(filename).read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def kernel_bodies(filename: str) -> dict[str, str]:
    """Splits a .metal file into {kernel name: body} at its "//// kernel: NAME" lines."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in read_metal(filename).splitlines():
        if line.startswith(_MARK):
            current = line[len(_MARK):].strip()
            bodies[current] = []
        elif current is not None:
            bodies[current].append(line)
    return {name: "\n".join(lines).strip("\n") + "\n" for name, lines in bodies.items()}


def kernel_source(name: str) -> tuple[str, str]:
    """(body, header) of a kernel in KERNELS."""
    filename, header, _, _ = KERNELS[name]
    return kernel_bodies(filename)[name], read_metal(header)


def get_kernel(name: str):
    """The `mx.fast.metal_kernel` object for `name`, built on first use with the current factory."""
    factory = mx.fast.metal_kernel
    with _lock:
        hit = _built.get(name)
        if hit is not None and hit[0] is factory:
            return hit[1]
        body, header = kernel_source(name)
        _, _, inputs, outputs = KERNELS[name]
        kernel = factory(name=f"zkv_{name}", input_names=inputs, output_names=outputs, source=body, header=header)
        _built[name] = (factory, kernel)
        return kernel


def clear() -> None:
    """Forgets built kernels (tests)."""
    with _lock:
        _built.clear()
