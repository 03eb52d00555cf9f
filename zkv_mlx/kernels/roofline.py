"""Bytes the paged decode kernels read per generated token, and the memory-bandwidth roofline on M1-M4.

Decode attention does 4 FLOPs per K/V element pair per query head: with G query heads per KV head that is
~G FLOPs per byte of fp16 KV (4G per byte of 4-bit KV, plus dequantization), below the ~25-40 FLOPs/byte
ridge point of Apple GPUs at common G, so its time is bounded below by bytes read / peak bandwidth.

    python -m zkv_mlx.kernels.roofline      # prints the tables of docs/kernels.md
"""

from __future__ import annotations

# Apple's published unified-memory bandwidth (GB/s, 1e9 bytes/s); two numbers where GPU bins differ.
PEAK_GBPS = {
    "M1": 68.25, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max (30-core GPU)": 300, "M3 Max (40-core GPU)": 400, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max (32-core GPU)": 410, "M4 Max (40-core GPU)": 546,
}

# name -> (bits, group size); quantized rows also carry an fp16 scale and bias per group
FORMATS = {"fp32": (32, 0), "fp16/bf16": (16, 0), "q8 g32": (8, 32), "q8 g64": (8, 64), "q4 g32": (4, 32),
           "q4 g64": (4, 64)}
# Keys per channel over a block of 32 tokens carry one fp16 scale and bias per channel and block: per row the
# same metadata as a group of 32 along head_dim; with 8-bit metadata (an e4m3 scale and a zero point,
# kernels/kv_meta.py) one byte each. The tail block and the sinks (full precision, at most 35 rows per sequence
# and layer) are left out.
FORMATS["q4 c32"] = (4, 32)
FORMATS["q4 c32 e4m3"] = (4, 32, 1)  # (bits, group, bytes per scale and per bias)
# (K format, V format) pairs printed as one row: the int4 KV format (issue #19) and the one before it
MIXED = {"int4 default: K q4 c32 e4m3 + V q4 g32": ("q4 c32 e4m3", "q4 g32"),
         "int4-f16 (int4 before issue #19): K q4 c32 + V q4 g64": ("q4 c32", "q4 g64")}

MODELS = {  # (layers, KV heads, head_dim)
    "SmolLM2-135M (bundled)": (30, 3, 64),
    "Llama-3-8B shape": (32, 8, 128),
}


def row_bytes(head_dim: int, bits: int, group_size: int, scale_bytes: int = 2) -> float:
    """Bytes of one K or V row (one token, one KV head)."""
    data = head_dim * bits / 8
    return data + (2 * scale_bytes * head_dim / group_size if group_size else 0)


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, context: int, k_format: str,
                       v_format: str | None = None, window: int | None = None) -> float:
    """K and V bytes read over all layers to decode one token of one sequence at `context` positions.

    Block-table reads (4 bytes per block) and the query are negligible and left out. Each KV row is read by
    the GQA-ratio threadgroups of its query heads; this counts it once (the repeats hit the GPU caches).
    With a sliding window W the kernels read only the min(context, W) visible rows (blocks wholly before the
    window are skipped, the first block's earlier rows masked before they are loaded).
    """
    k = row_bytes(head_dim, *FORMATS[k_format])
    v = row_bytes(head_dim, *FORMATS[v_format or k_format])
    rows = context if window is None else min(context, window)
    return n_layers * n_kv_heads * rows * (k + v)


def plan_bytes_per_token(plan: list[tuple[int, int | None]], n_kv_heads: int, head_dim: int, context: int,
                         k_format: str, v_format: str | None = None) -> float:
    """`kv_bytes_per_token` summed over a layer plan [(n_layers, window or None), ...] (e.g. 5:1 local:global)."""
    return sum(kv_bytes_per_token(n, n_kv_heads, head_dim, context, k_format, v_format, w) for n, w in plan)


def main() -> None:
    contexts = (4096, 32768)
    for model, (layers, kv_heads, d) in MODELS.items():
        print(f"\nKV bytes read per decoded token, {model} ({layers} layers, {kv_heads} KV heads, head_dim {d}):\n")
        print("| format | bytes/element | " + " | ".join(f"L={c}" for c in contexts) + " |")
        print("|---|---|" + "---|" * len(contexts))
        rows = {name: (name, name) for name in FORMATS if not name.startswith("q4 c32")} | MIXED
        for name, (kf, vf) in rows.items():
            per_elem = (row_bytes(d, *FORMATS[kf]) + row_bytes(d, *FORMATS[vf])) / (2 * d)
            sizes = [kv_bytes_per_token(layers, kv_heads, d, c, kf, vf) / 2**20 for c in contexts]
            print(f"| {name} | {per_elem:.4g} | " + " | ".join(f"{s:,.1f} MiB" for s in sizes) + " |")
    layers, kv_heads, d = MODELS["Llama-3-8B shape"]
    context = 32768
    names = ("fp16/bf16", "q8 g64", "q4 g32", "int4 default")
    pairs = {"int4 default": ("q4 c32 e4m3", "q4 g32")}
    print(f"\nAttention-only lower bound per decode step, Llama-3-8B shape, L={context}, batch 1 (ms):\n")
    print("| chip | GB/s | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for chip, gbps in PEAK_GBPS.items():
        ms = [kv_bytes_per_token(layers, kv_heads, d, context, *pairs.get(n, (n,))) / (gbps * 1e9) * 1e3
              for n in names]
        print(f"| {chip} | {gbps:g} | " + " | ".join(f"{t:.2f}" for t in ms) + " |")
    # Gemma-3-27B-like plan: 62 layers, 16 KV heads, head_dim 128, 5 of every 6 layers local with W = 1024
    plans = {"all 62 layers global": [(62, None)], "52 local (W=1024) + 10 global": [(52, 1024), (10, None)]}
    print("\nKV bytes read per decoded token with sliding-window layers, Gemma-3-27B-like (16 KV heads, "
          "head_dim 128), fp16:\n")
    print("| layer plan | " + " | ".join(f"L={c}" for c in contexts) + " |")
    print("|---|" + "---|" * len(contexts))
    for name, plan in plans.items():
        sizes = [plan_bytes_per_token(plan, 16, 128, c, "fp16/bf16") / 2**20 for c in contexts]
        print(f"| {name} | " + " | ".join(f"{x:,.1f} MiB" for x in sizes) + " |")


if __name__ == "__main__":
    main()
