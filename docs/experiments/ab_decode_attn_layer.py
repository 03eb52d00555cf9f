"""One decode step's attention over 30 layers' pools, in isolation: variants A/B alternating in one process.

Issue #20 (w/dattn9). Real shapes of the bundled model (SmolLM2-135M: 9 query heads, 3 kv heads, head_dim 64,
block size 16, float32 pool); each layer has its own pool and the sequence's blocks are one contiguous run (as
the engine allocates a fresh sequence), or scattered in `--runs` pieces. Prints JSON: per context and variant the
median ms for all layers' attention (graph build + eval), and the ratios to variant "current" (this code; "old" = main
before w/dattn9, _old_decode_attention.py; docs/benchmarks.md calls them new and old).

    flock -x /tmp/s9/cpu.lock nice -n -20 .venv/bin/python docs/experiments/ab_decode_attn_layer.py --contexts 2048,8192
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import zkv_mlx  # noqa: F401  (loads OpenBLAS before mlx.core, zkv_mlx/_blas.py)
import mlx.core as mx
from _old_decode_attention import old_single_decode_attention

from zkv_mlx.kernels import reference as ref

H, HKV, D, BS, LAYERS = 9, 3, 64, 16, 30


def variants():
    v = {"current": lambda q, k, v, t, n, p: ref.single_decode_attention(q, k, v, t, n, 0.125, plan=p)}
    v["old"] = lambda q, k, v, t, n, p: old_single_decode_attention(q, k, v, t, n, 0.125, plan=p)
    return v


def run(context: int, rounds: int, reps: int, runs: int) -> dict:
    nb = -(-context // BS)
    pool_blocks = nb + 8 * runs
    pools = [(mx.random.normal((pool_blocks, HKV, BS, D)), mx.random.normal((pool_blocks, HKV, BS, D)))
             for _ in range(LAYERS)]
    qs = [mx.random.normal((1, H, 1, D)) for _ in range(LAYERS)]
    mx.eval(pools, qs)
    # the table: `runs` contiguous pieces with gaps of 8 blocks between them
    table, per = [], -(-nb // runs)
    for r in range(runs):
        table += list(range(r * (per + 8), r * (per + 8) + min(per, nb - len(table))))
    plan = ref.decode_plan(table, context, BS)
    vs = variants()
    outs = {name: mx.stack([f(q, k, v, table, context, plan) for q, (k, v) in zip(qs, pools)])
            for name, f in vs.items()}
    mx.eval(outs)
    base = outs["current"]
    diff = {name: float(mx.abs(o - base).max()) for name, o in outs.items()}
    times = {name: [] for name in vs}
    for _ in range(rounds):
        for name, f in vs.items():
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                mx.eval([f(q, k, v, table, context, plan) for q, (k, v) in zip(qs, pools)])
                ts.append(time.perf_counter() - t0)
            times[name].append(min(ts) * 1e3)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"context": context, "runs": runs, "ms_all_layers": med,
            "speedup_vs_current": {n: med["current"] / m for n, m in med.items()}, "max_abs_diff": diff}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="2048,4096,8192")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--runs", type=int, default=1)
    a = ap.parse_args()
    for c in map(int, a.contexts.split(",")):
        print(json.dumps(run(c, a.rounds, a.reps, a.runs)), flush=True)


if __name__ == "__main__":
    main()
