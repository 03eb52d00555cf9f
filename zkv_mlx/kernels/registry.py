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
# window: 0-d int sliding window (0 = none); sink_logits: float32 [n_heads] (a 1-element dummy without sinks)
_ATTN_INPUTS = ["q", "k", "k_scales", "k_biases", "v", "v_scales", "v_biases", "block_tables", "context_lens",
                "scale", "window", "sink_logits"]
# keys per channel (kv_format.ChannelKeyPool): the tail and sink slabs and the per-block slot table after K
_CK_INPUTS = ["q", "k", "k_scales", "k_biases", "k_tail", "k_sinks", "k_slots", "v", "v_scales", "v_biases",
              "block_tables", "context_lens", "scale", "window", "sink_logits"]
_FILE = "paged_attention.metal"
_COMMON = "paged_common.h"
_BLOCKS = ("paged_common.h", "paged_blocks.h")  # header = the files concatenated

# kernel -> (file, header file(s), input names, output names)
KERNELS: dict[str, tuple[str, str | tuple[str, ...], list[str], list[str]]] = {
    "paged_attention_1pass": (_FILE, _COMMON, _ATTN_INPUTS, ["out"]),
    "paged_attention_2pass_partial": (_FILE, _COMMON, _ATTN_INPUTS + ["partition"], ["o_part", "ml"]),
    "paged_attention_2pass_reduce": (_FILE, _COMMON, ["o_part", "ml", "sink_logits"], ["out"]),
    # attention mass (H2O): block statistics next to the usual outputs, then paged_attention_mass
    "paged_attention_1pass_mass": (_FILE, _BLOCKS, _ATTN_INPUTS, ["out", "ml", "bstats"]),
    "paged_attention_2pass_partial_mass": (_FILE, _BLOCKS, _ATTN_INPUTS + ["partition"], ["o_part", "ml", "bstats"]),
    "paged_attention_mass": (_FILE, _COMMON, ["bstats", "ml", "context_lens", "window", "sink_logits"], ["mass"]),
    # keys per channel with tail and sinks (pass 2 is paged_attention_2pass_reduce)
    "paged_attention_ck_1pass": (_FILE, _BLOCKS, _CK_INPUTS, ["out"]),
    "paged_attention_ck_2pass_partial": (_FILE, _BLOCKS, _CK_INPUTS + ["partition"], ["o_part", "ml"]),
    "paged_attention_ck_1pass_mass": (_FILE, _BLOCKS, _CK_INPUTS, ["out", "ml", "bstats"]),
    "paged_attention_ck_2pass_partial_mass": (_FILE, _BLOCKS, _CK_INPUTS + ["partition"],
                                              ["o_part", "ml", "bstats"]),
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
    headers = (header,) if isinstance(header, str) else header
    return kernel_bodies(filename)[name], "".join(read_metal(h) for h in headers)


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
