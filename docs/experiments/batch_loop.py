"""Where a batched decode step's time goes: the bench's round (stream threads) vs the engine stepped directly
(no stream threads) vs the bare mlx-lm model, in one process, alternating.

Not a shipped command (issue #20 item 4, w/batch8). Per round, with N greedy streams of --tokens tokens each on
32-token prompts (distinct text windows, no prefix hits):
- "thread": `bench batch`'s own round (one thread per stream submitting through the API), steady-state tok/s;
- "direct": the same N requests added on the engine thread and `Engine.step` called in a loop (no stream
  threads, no queue), steady-state tok/s and the median step time split into graph building
  (`ModelRunner.decode` + sampling graph), `mx.async_eval` (waits while MLX still runs the previous step) and
  resolving (token read-back + postprocess);
- "model": the bare model's step for 1 and N rows (as the bench's ceiling).
Also one "direct" single-stream round for the single-stream step time.

    .venv/bin/python docs/experiments/batch_loop.py --streams 8 --tokens 48 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import zkv_mlx  # noqa: F401


def _direct(eng, prompts: list[list[int]], tokens: int) -> dict:
    """Runs the requests by stepping the engine on its own thread; returns rates and the step split (ms)."""
    from zkv_mlx.engine import engine as engine_mod
    from zkv_mlx.engine.sequence import SamplingParams

    stamps: list[list[float]] = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        def listener(ev, i=i):
            if ev.token_id is not None:
                stamps[i].append(time.perf_counter())
        eng.add_request(p, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), "local", listener)
    split = {"build": [], "async_eval": [], "resolve": [], "step": []}
    cur = {}
    runner = eng.runner
    orig_decode, orig_resolve, orig_async = runner.decode, eng._resolve, engine_mod.mx.async_eval

    def decode(*a, **k):
        t0 = time.perf_counter()
        out = orig_decode(*a, **k)
        cur["build"] = cur.get("build", 0.0) + time.perf_counter() - t0
        return out

    def resolve():
        t0 = time.perf_counter()
        out = orig_resolve()
        cur["resolve"] = cur.get("resolve", 0.0) + time.perf_counter() - t0
        return out

    class _MX:  # the engine module's `mx` with async_eval timed
        def __getattr__(self, name):
            return getattr(engine_mod.mx_real, name)

        def async_eval(self, *a):
            t0 = time.perf_counter()
            orig_async(*a)
            cur["async_eval"] = cur.get("async_eval", 0.0) + time.perf_counter() - t0

    engine_mod.mx_real = engine_mod.mx
    engine_mod.mx = _MX()
    runner.decode, eng._resolve = decode, resolve
    try:
        while eng.has_work():
            cur.clear()
            t0 = time.perf_counter()
            eng.step()
            dt = time.perf_counter() - t0
            if "async_eval" in cur and len(eng.scheduler.running) == len(prompts):
                split["step"].append(dt)
                for k in ("build", "async_eval", "resolve"):
                    split[k].append(cur.get(k, 0.0))
    finally:
        engine_mod.mx = engine_mod.mx_real
        del runner.decode, eng._resolve
    start, end = max(st[0] for st in stamps), min(st[-1] for st in stamps)
    n = sum(1 for st in stamps for t in st if start < t <= end)
    out = {"tok_s": n / (end - start)}
    out.update({f"{k}_ms": statistics.median(v) * 1e3 for k, v in split.items() if v})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-model", action="store_true")
    args = ap.parse_args()

    from zkv_mlx import ZKV
    from zkv_mlx.bench.batch import _model_step_ms, _round
    from zkv_mlx.bench.common import bench_tokens

    N, T = args.streams, args.tokens
    model = ZKV(max_context=32 + T + 16, max_num_seqs=16)
    per = 2 * (N + 1)
    text = bench_tokens(model.tokenizer, 32 * per * (args.rounds + 1))
    win = [text[i * 32:(i + 1) * 32] for i in range(per * (args.rounds + 1))]
    _round(model, win[:N], 8)
    model._thread.call(lambda eng: _direct(eng, win[N:2 * N], 8))
    rows = []
    for r in range(args.rounds):
        w = win[per * (r + 1): per * (r + 2)]
        row = {"round": r}
        row["thread_1"], _ = _round(model, w[:1], T)
        row["thread_n"], _ = _round(model, w[1:N + 1], T)
        row["direct_1"] = model._thread.call(lambda eng: _direct(eng, w[N + 1:N + 2], T))
        row["direct_n"] = model._thread.call(lambda eng: _direct(eng, w[N + 2:2 * N + 2], T))
        print(json.dumps(row), flush=True)
        rows.append(row)
    model.close()
    summary = {"streams": N, "tokens": T, "rounds": args.rounds}
    med = lambda xs: round(statistics.median(xs), 2)  # noqa: E731
    summary["thread_speedup"] = med([r["thread_n"] / r["thread_1"] for r in rows])
    summary["direct_speedup"] = med([r["direct_n"]["tok_s"] / r["direct_1"]["tok_s"] for r in rows])
    for side in ("direct_1", "direct_n"):
        for k in rows[0][side]:
            summary[f"{side}_{k}"] = med([r[side][k] for r in rows])
    if not args.skip_model:
        from zkv_mlx.models.loader import load_model

        m = load_model(None, "float32").model
        one, many = [], []
        for _ in range(args.rounds):
            one.append(_model_step_ms(m, 1))
            many.append(_model_step_ms(m, N))
        summary.update(model_step_ms_1=med(one), model_step_ms_n=med(many),
                       model_ceiling=round(N * statistics.median(one) / statistics.median(many), 2))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
