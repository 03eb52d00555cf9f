"""What each `--kv-quant` name stores: bits of K and V, the value group, the per-channel key block and the width
of the per-channel key metadata. The one place a quantized format's parameters live (config.py validates names
against it, kernels/kv_quant.py builds a `QuantSpec` from it), so a variant is one more row.

No MLX import: the config and the TUI read it without loading MLX.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVPreset:
    """One `--kv-quant` name.

    k_bits, v_bits: bits per key and value element (4 or 8).
    group: per-token group along head_dim of values (and of keys in the token layout) unless --kv-group-size.
    key_meta: metadata of keys quantized per channel: "f16" (float16 scale and bias per channel and block) or
        "e4m3" (an 8-bit e4m3 scale rounded up and an 8-bit integer zero point: kernels/kv_meta.py).
    key_block: tokens per block (= per-channel key block) when the block size is "auto" and keys are per channel.
    channel_default: keys per channel under key_layout "auto".
    """

    k_bits: int
    v_bits: int
    group: int
    key_meta: str = "f16"
    key_block: int = 32
    channel_default: bool = False


KV_PRESETS: dict[str, KVPreset] = {
    # groups of 32: groups of 64 measured +0.145% perplexity on a held-out text (docs/benchmarks.md, issue #19)
    "int8": KVPreset(8, 8, 32),
    # issue #19's choice by held-out measurement (docs/benchmarks.md, docs/experiments/kv_candidates.py:
    # "c32 u8 / v g32 f16"): 9.5 bits per element, 0.297x fp16
    "int4": KVPreset(4, 4, 32, key_meta="e4m3", channel_default=True),
    # int4 before issue #19 (float16 key scale and bias, values in groups of 64): its session files still open
    "int4-f16": KVPreset(4, 4, 64, channel_default=True),
    "k8v4": KVPreset(8, 4, 64),
}


def flags_for_format(kv_format: str) -> str | None:
    """The settings that make an engine store `kv_format` (a `KVPool.format_name`, as session files record it),
    e.g. "--kv-quant int4-f16 --kv-dtype float32 --block-size 32"; settings without a flag are named as config file
    keys. None when the name is not one this version makes (then no setting opens the file)."""
    fields = [p.split("=", 1) if "=" in p else ("dtype", p) for p in kv_format.split(";")]
    parts = dict(fields)
    if not {"dtype", "block"} <= parts.keys():
        return None
    flags = [f"--kv-dtype {parts['dtype']}", f"--block-size {parts['block']}"]
    if "k" not in parts:
        return " ".join(["--kv-quant none", *flags])
    k = re.fullmatch(r"q(\d)(?:c(\d+)(e4m3)?|g(\d+))", parts["k"])
    v = re.fullmatch(r"q(\d)g(\d+)", parts.get("v", ""))
    if not (k and v):
        return None
    k_bits, channel, meta, v_bits, group = int(k[1]), k[2] is not None, k[3] or "f16", int(v[1]), int(v[2])
    for name, p in KV_PRESETS.items():
        if (p.k_bits, p.v_bits) != (k_bits, v_bits) or channel and p.key_meta != meta:
            continue
        out = [f"--kv-quant {name}", *flags]
        if group != p.group and group in (32, 64):  # smaller: the pool clipped it to a small head_dim
            out.append(f"--kv-group-size {group}")
        extra = []
        if channel != p.channel_default:
            extra.append(f"kv.key_layout = \"{'channel' if channel else 'token'}\"")
        if channel and int(parts.get("sinks", 0)) != 4:
            extra.append(f"kv.sinks = {int(parts.get('sinks', 0))}")
        return " ".join(out) + (f" (config file: {', '.join(extra)})" if extra else "")
    return None
