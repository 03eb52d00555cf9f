"""A/B in one process: `bench batch`'s rounds on an engine with the "dynamic" default pool (four contexts: the
bench before w/batch8) vs one with a pool for every stream (the bench now), alternating.

Not a shipped command (issue #20 item 4, w/batch8). Two engines on the same weights; per round: one single stream
and one batch of N streams on each engine (distinct prompts everywhere, the bench's own `_round`), so each
engine's speedup is its batched over its single rate in the same round. Prints per-round rows, then medians and
each engine's preemptions.

    .venv/bin/python docs/experiments/ab_batch_pool.py --streams 8 --tokens 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics

import zkv_mlx  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from zkv_mlx import ZKV
    from zkv_mlx.bench.batch import _blocks_needed, _round
    from zkv_mlx.bench.common import bench_tokens

    N, T, plen = args.streams, args.tokens, 32
    ctx = plen + T + 16
    engines = {"dynamic": ZKV(max_context=ctx, max_num_seqs=16)}
    st = engines["dynamic"].kv_cache_stats()
    need = _blocks_needed(N, ctx, st["block_size"])
    engines["sized"] = ZKV(max_context=ctx, max_num_seqs=16,
                           kv_cache_memory=need * -(-st["total_size"] // st["blocks_total"]))
    per = 2 * (N + 1)
    text = bench_tokens(engines["dynamic"].tokenizer, plen * per * (args.rounds + 1))
    win = [text[i * plen:(i + 1) * plen] for i in range(per * (args.rounds + 1))]
    for j, m in enumerate(engines.values()):
        _round(m, win[j * N:(j + 1) * N], 8)
    res = {k: {"single": [], "batched": []} for k in engines}
    for r in range(args.rounds):
        w = win[per * (r + 1): per * (r + 2)]
        row = {"round": r}
        for j, (name, m) in enumerate(engines.items()):
            ws = w[j * (N + 1):(j + 1) * (N + 1)]
            res[name]["single"].append(_round(m, ws[:1], T)[0])
            res[name]["batched"].append(_round(m, ws[1:], T)[0])
            row[name] = {k: round(v[-1], 2) for k, v in res[name].items()}
        print(json.dumps(row), flush=True)
    out = {"streams": N, "tokens": T, "rounds": args.rounds}
    for name, m in engines.items():
        s = m.kv_cache_stats()
        single, batched = statistics.median(res[name]["single"]), statistics.median(res[name]["batched"])
        out[name] = {"kv_blocks": s["blocks_total"], "preemptions": s["preemptions"], "single_tok_s": round(single, 2),
                     "batched_tok_s": round(batched, 2), "speedup": round(batched / single, 2),
                     "speedup_per_round": [round(b / a, 2) for a, b in zip(res[name]["single"],
                                                                           res[name]["batched"])]}
        m.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
