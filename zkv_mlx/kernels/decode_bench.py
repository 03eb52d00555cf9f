"""Decode attention alone, all layers of one step: zkv's CPU path vs mlx-lm's contiguous sdpa.

    python -m zkv_mlx.kernels.decode_bench --json [--contexts 2048,4096,8192] [--rounds 5] [--window W]

One decode step's attention for every layer (the bundled model's geometry by default: 30 layers, 9 query
heads, 3 KV heads, head_dim 64, float32 KV, block size 16) is built and evaluated as one graph:
- zkv: `single_decode_attention` over the paged pool (the engine's path for contexts above
  GROUPED_MAX_LEN), with the step's `decode_plan` made once for all layers, as the engine does;
- mlx-lm: `mx.fast.scaled_dot_product_attention` over a contiguous [1, H_kv, L, D] slice of a KVCache-like
  buffer (what mlx-lm's `generate_step` runs per layer).
Rounds alternate A/B in one process; the result line gives per-context medians in ms per step and the ratio
(mlx-lm time / zkv time: above 1 means zkv is faster), and zkv_build_ms, the part of zkv's step spent in Python
building the graph before any compute. The machine is shared: read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx

from .reference import decode_plan, single_decode_attention


def _setup(ctx: int, layers: int, heads: int, kv_heads: int, d: int, bs: int, dtype, window):
    nb = -(-ctx // bs)
    mx.random.seed(0)
    pools = [(mx.random.normal((nb + 1, kv_heads, bs, d)).astype(dtype),
              mx.random.normal((nb + 1, kv_heads, bs, d)).astype(dtype)) for _ in range(layers)]
    step = 256  # mlx-lm's KVCache grows its buffer in steps of 256 positions and slices it to the offset
    cap = -(-ctx // step) * step
    dense = [(mx.random.normal((1, kv_heads, cap, d)).astype(dtype),
              mx.random.normal((1, kv_heads, cap, d)).astype(dtype)) for _ in range(layers)]
    q = mx.random.normal((1, heads, 1, d)).astype(dtype)
    mx.eval(pools, dense, q)
    table = list(range(1, nb + 1))  # a fresh sequence's blocks are one contiguous run
    return pools, dense, q, table


def _zkv_step(pools, q, table, ctx, bs, scale, window, build_ms: list | None = None):
    t0 = time.perf_counter()
    plan = decode_plan(table, ctx, bs, window)  # once per step for all layers
    outs = [single_decode_attention(q, k, v, table, ctx, scale, plan=plan, window=window) for k, v in pools]
    if build_ms is not None:
        build_ms.append((time.perf_counter() - t0) * 1e3)  # Python and graph building, before any compute
    mx.eval(outs)


def _mlx_lm_step(dense, q, ctx, scale, window):
    mask = None
    if window is not None and ctx > window:
        mask = (mx.arange(ctx) >= ctx - window)[None, None, None, :]
    outs = [mx.fast.scaled_dot_product_attention(q, k[..., :ctx, :], v[..., :ctx, :], scale=scale, mask=mask)
            for k, v in dense]
    mx.eval(outs)


def _time(fn, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e3


def run(contexts, rounds=5, iters=5, layers=30, heads=9, kv_heads=3, head_dim=64, block_size=16,
        dtype=mx.float32, window=None, emit=print) -> list[dict]:
    """Runs the A/B rounds; returns one result dict per context (also emitted as JSON lines)."""
    scale = head_dim ** -0.5
    results = []
    for ctx in contexts:
        pools, dense, q, table = _setup(ctx, layers, heads, kv_heads, head_dim, block_size, dtype, window)
        z = lambda: _zkv_step(pools, q, table, ctx, block_size, scale, window)  # noqa: E731
        m = lambda: _mlx_lm_step(dense, q, ctx, scale, window)  # noqa: E731
        z(), m()  # warm-up: compiled graphs, allocator
        zt, mt, build = [], [], []
        for _ in range(rounds):
            zt.append(_time(z, iters))
            mt.append(_time(m, iters))
            _zkv_step(pools, q, table, ctx, block_size, scale, window, build)
        row = {"context": ctx, "window": window, "layers": layers, "zkv_ms": round(statistics.median(zt), 3),
               "mlx_lm_ms": round(statistics.median(mt), 3),
               "ratio": round(statistics.median(mt) / statistics.median(zt), 3),
               "zkv_build_ms": round(statistics.median(build), 3), "rounds": rounds, "iters": iters}
        emit(json.dumps(row))
        results.append(row)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zkv_mlx.kernels.decode_bench", description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="2048,4096,8192")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--json", action="store_true", help="JSON lines (the default output too)")
    args = p.parse_args(argv)
    run([int(c) for c in args.contexts.split(",")], args.rounds, args.iters, args.layers, window=args.window)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
