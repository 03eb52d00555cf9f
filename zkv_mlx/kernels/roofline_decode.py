"""Bytes moved per decoded token, weights and KV together, at 2K/4K/8K for each KV format, and the tokens/s that
M-series bandwidths allow for them (on paper: no Mac measured it).

A decode step of batch 1 reads every weight once and every K/V row of the context once (`roofline`); the rest
(activations, the query, block tables) is under 1% at these sizes and is left out. Upper bound on tokens/s =
peak bandwidth / bytes per token.

    python -m zkv_mlx.kernels.roofline_decode      # prints the tables of docs/kernels.md, "Bytes per decode token"
"""

from __future__ import annotations

from .roofline import PEAK_GBPS, kv_bytes_per_token

# The engine's KV formats as (K format, V format) of `roofline.FORMATS` (--kv-quant presets: kv_presets.py).
KV_FORMATS = {
    "fp32": ("fp32", "fp32"),
    "fp16/bf16": ("fp16/bf16", "fp16/bf16"),
    "int8": ("q8 g32", "q8 g32"),
    "k8v4": ("q8 g64", "q4 g64"),
    "int4": ("q4 c32 e4m3", "q4 g32"),
    "int4-f16": ("q4 c32", "q4 g64"),
}
CONTEXTS = (2048, 4096, 8192)
# (layers, KV heads, head_dim, parameters, weight bytes per parameter as usually run on a Mac)
MODELS = {
    "SmolLM2-135M (bundled), fp16 weights": (30, 3, 64, 134.5e6, 2.0),
    "Llama-3-8B shape, 4-bit g64 weights": (32, 8, 128, 8.03e9, 0.5625),
}


def bytes_per_token(model: str, kv_format: str, context: int) -> tuple[float, float]:
    """(weight bytes, KV bytes) read to decode one token of one sequence at `context` positions."""
    layers, kv_heads, d, params, per_param = MODELS[model]
    return params * per_param, kv_bytes_per_token(layers, kv_heads, d, context, *KV_FORMATS[kv_format])


def main() -> None:
    for model in MODELS:
        weights = bytes_per_token(model, "fp32", 1)[0]
        print(f"\nMiB moved per decoded token, {model} (weights {weights / 2**20:,.0f} MiB + KV):\n")
        print("| KV format | " + " | ".join(f"KV L={c}" for c in CONTEXTS) + f" | total L={CONTEXTS[-1]} |")
        print("|---|" + "---|" * (len(CONTEXTS) + 1))
        for fmt in KV_FORMATS:
            kv = [bytes_per_token(model, fmt, c)[1] / 2**20 for c in CONTEXTS]
            print(f"| {fmt} | " + " | ".join(f"{x:,.1f}" for x in kv) + f" | {weights / 2**20 + kv[-1]:,.0f} |")
    model = "Llama-3-8B shape, 4-bit g64 weights"
    fmts = ("fp16/bf16", "int8", "k8v4", "int4")
    print(f"\nUpper bound on decode tokens/s, {model}, batch 1, L={CONTEXTS[-1]}:\n")
    print("| chip | GB/s | " + " | ".join(fmts) + " |")
    print("|---|---|" + "---|" * len(fmts))
    for chip, gbps in PEAK_GBPS.items():
        rates = [gbps * 1e9 / sum(bytes_per_token(model, f, CONTEXTS[-1])) for f in fmts]
        print(f"| {chip} | {gbps:g} | " + " | ".join(f"{r:.1f}" for r in rates) + " |")


if __name__ == "__main__":
    main()
