"""A/B in one process: a batch of sampled streams with a repetition penalty, decoded pipelined (w/batch8: the
in-flight token counted in the penalty) vs resolved after every step (nothing in flight when the next step
samples: the synchronous sampling the engine did for penalized batches before).

Not a shipped command (issue #20 item 4, w/batch8). The bundled model, N requests of 32-token prompts
(temperature 0.7, top-p 0.9, repetition penalty 1.1, seeded) added on the engine thread and stepped directly;
the two modes alternate for --rounds rounds on distinct prompts; tokens/s over the decode steps with all N
sequences running. Both modes give the same tokens (tests/test_equivalence.py::
test_pipelined_penalty_equals_resolved_steps).

    .venv/bin/python docs/experiments/ab_penalty_pipeline.py --streams 8 --tokens 32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import zkv_mlx  # noqa: F401


def _run(eng, prompts, tokens: int, resolve_each_step: bool) -> float:
    from zkv_mlx.engine.sequence import SamplingParams

    seqs = [eng.add_request(p, SamplingParams(max_tokens=tokens, temperature=0.7, top_p=0.9, repetition_penalty=1.1,
                                              seed=i, ignore_eos=True), "local", lambda ev: None)
            for i, p in enumerate(prompts)]
    n, t = 0, 0.0
    while eng.has_work():
        full = all(not s.in_prefill for s in seqs) and not any(s.is_finished for s in seqs)
        t0 = time.perf_counter()
        got = eng.step()
        if resolve_each_step:
            got += eng._resolve()
        if full:
            n, t = n + got, t + time.perf_counter() - t0
    return n / t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from zkv_mlx import ZKV
    from zkv_mlx.bench.common import bench_tokens

    N = args.streams
    model = ZKV(max_context=32 + args.tokens + 16, max_num_seqs=16, kv_cache_memory="256MB")
    text = bench_tokens(model.tokenizer, 32 * 2 * N * (args.rounds + 1))
    win = [text[i * 32:(i + 1) * 32] for i in range(2 * N * (args.rounds + 1))]
    model._thread.call(lambda eng: _run(eng, win[:N], 4, False))
    res = {"pipelined": [], "resolved": []}
    for r in range(args.rounds):
        w = win[2 * N * (r + 1): 2 * N * (r + 2)]
        for j, mode in enumerate(res):
            res[mode].append(model._thread.call(lambda eng: _run(eng, w[j * N:(j + 1) * N], args.tokens,
                                                                 mode == "resolved")))
        print(json.dumps({"round": r, **{k: round(v[-1], 2) for k, v in res.items()}}), flush=True)
    model.close()
    p, s = statistics.median(res["pipelined"]), statistics.median(res["resolved"])
    print(json.dumps({"streams": N, "tokens": args.tokens, "pipelined_tok_s": round(p, 2),
                      "resolved_tok_s": round(s, 2), "ratio": round(p / s, 3),
                      "ratio_per_round": [round(a / b, 3) for a, b in zip(res["pipelined"], res["resolved"])]}),
          flush=True)


if __name__ == "__main__":
    main()
