"""The decode step for 1 and for B sequences, zkv's runner vs the bare mlx-lm model, pipelined as each engine
runs it, alternating in one process.

Not a shipped command (issue #20 item 4, w/batch8). Same float32 weights, the engine's default KV dtype, random
K/V of --context positions per sequence. Each measurement is --steps greedy steps chained the way
`Engine._decode` and mlx-lm's generate_step chain them (step s+1's graph is built from step s's lazy tokens and
queued with `mx.async_eval` before step s's tokens are read); the four loops (zkv 1, zkv B, mlx-lm 1, mlx-lm B)
alternate for --rounds rounds. Prints per-round ms per step and the medians with the 1-vs-B speedups
(B * t1 / tB): the runner's own ceiling next to the model's.

    .venv/bin/python docs/experiments/batch_ceiling.py --batch 8 --context 64 --steps 8 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import zkv_mlx  # noqa: F401
import mlx.core as mx

from profile_decode_step import _Seq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    from mlx_lm.models.cache import make_prompt_cache

    from zkv_mlx.engine.runner import ModelRunner
    from zkv_mlx.models.loader import load_model

    lm = load_model(None, "float32")
    model = lm.model
    B, n, bs = args.batch, args.context, 16
    H, D, L = lm.n_kv_heads, lm.head_dim, lm.n_layers
    nbs = -(-n // bs)
    runner = ModelRunner(lm, (B + 1) * nbs + 2, bs, lm.dtype)
    pool = runner.pool
    for i in range(L):
        pool.k[i] = mx.random.normal(pool.k[i].shape).astype(lm.dtype)
        pool.v[i] = mx.random.normal(pool.v[i].shape).astype(lm.dtype)
    mx.eval(pool.k, pool.v)
    seqs = [_Seq(n, list(range(1 + b * nbs, 1 + (b + 1) * nbs))) for b in range(B + 1)]
    many, one = seqs[:B], seqs[B:]
    caches = {}
    for b in (1, B):
        cache = make_prompt_cache(model)
        for c in cache:
            c.update_and_fetch(mx.random.normal((b, H, n - 1, D)), mx.random.normal((b, H, n - 1, D)))
        mx.eval([c.state for c in cache])
        caches[b] = cache

    def zkv(group):
        def run():
            y = mx.argmax(runner.decode(group), axis=-1).astype(mx.int32)
            mx.async_eval(y)
            for _ in range(args.steps):
                nxt = mx.argmax(runner.decode(group, y), axis=-1).astype(mx.int32)
                mx.async_eval(nxt)
                y.tolist()
                y = nxt
            y.tolist()
            mx.eval(pool.k, pool.v)
        return run

    def mlx(b):
        cache = caches[b]

        def run():
            y = mx.argmax(model(mx.ones((b, 1), dtype=mx.int32), cache=cache)[:, -1], axis=-1)
            mx.async_eval(y)
            for _ in range(args.steps):
                nxt = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
                mx.async_eval(nxt)
                y.tolist()
                y = nxt
            y.tolist()
            for c in cache:  # back to n - 1 positions: every round decodes at the same context
                c.offset -= args.steps + 1
        return run

    loops = {"zkv_1": zkv(one), f"zkv_{B}": zkv(many), "mlx_1": mlx(1), f"mlx_{B}": mlx(B)}
    for f in loops.values():
        f()
    times = {k: [] for k in loops}
    for r in range(args.rounds):
        row = {"round": r}
        for k, f in loops.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) / (args.steps + 1) * 1e3)
            row[k] = round(times[k][-1], 1)
        print(json.dumps(row), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_round = lambda e: [B * a / b for a, b in zip(times[f"{e}_1"], times[f"{e}_{B}"])]  # noqa: E731
    print(json.dumps({"batch": B, "context": n, "steps": args.steps, "rounds": args.rounds,
                      **{f"{k}_ms": round(v, 1) for k, v in med.items()},
                      "zkv_speedup": round(statistics.median(per_round("zkv")), 2),
                      "mlx_speedup": round(statistics.median(per_round("mlx")), 2)}), flush=True)


if __name__ == "__main__":
    main()
