"""`zkv-mlx bench longctx`: decode speed as a conversation grows past the KV budget, full cache vs a policy.

One engine (prefix cache and SSD tier off, so every round computes), the same prompt; rounds alternate the full
cache and the policy (a per-request policy). Decode tokens/s is measured per segment of `--segment` tokens; the
result line: {"policy", "budget", "positions", "full_tok_s", "policy_tok_s", "full_flat", "policy_flat",
"policy_vs_full_last"} where *_flat = last segment's speed / first segment's speed (medians over rounds).
"""

from __future__ import annotations

import time

from .common import bench_tokens, emit, log, machine, median


def _segments(model, prompt, tokens: int, segment: int, policy) -> list[float]:
    times = []
    for ev in model.submit(prompt, temperature=0.0, max_tokens=tokens, ignore_eos=True, **policy):
        if ev.kind == "error":
            raise ev.error
        if ev.kind == "token":
            times.append(time.perf_counter())
    out = []
    for a in range(0, len(times) - segment, segment):
        out.append(segment / (times[a + segment] - times[a]))
    return out


def run(args) -> int:
    from ..cli_common import open_model
    from ..config import PolicyConfig

    kind = args.kv_policy if args.kv_policy not in (None, "full") else "window"
    budget = args.budget or 512
    args.kv_policy = args.budget = args.sinks = args.h2o_recent = None  # the engine default stays "full"
    args.prompt_cache, args.ssd_cache = False, "off"
    if args.max_context is None:
        args.max_context = args.prompt_tokens + args.tokens + 16
    model = open_model(args)
    try:
        prompt = bench_tokens(model.tokenizer, args.prompt_tokens)
        policy = {"kv_policy": kind, "budget": budget}
        PolicyConfig(kind=kind, budget=budget)  # validates
        for extra in ({}, policy):  # warm-up: compiled attention graphs and the allocator, both variants
            _segments(model, prompt[:64], 40, 8, extra)
        runs = {"full": [], "policy": []}
        for r in range(args.rounds):
            for name, extra in (("full", {}), ("policy", policy)):
                log(args, f"round {r + 1}/{args.rounds}: {name} ({args.prompt_tokens} prompt + {args.tokens} tokens)")
                segs = _segments(model, prompt, args.tokens, args.segment, extra)
                runs[name].append(segs)
                emit({"round": r + 1, "run": name, "tok_s": [round(x, 2) for x in segs]})
        n = min(len(s) for v in runs.values() for s in v)
        med = {k: [median([s[i] for s in v]) for i in range(n)] for k, v in runs.items()}
        positions = [args.prompt_tokens + (i + 1) * args.segment for i in range(n)]
        emit({"policy": kind, "budget": budget, "positions": positions,
              "full_tok_s": [round(x, 2) for x in med["full"]], "policy_tok_s": [round(x, 2) for x in med["policy"]],
              "full_flat": round(med["full"][-1] / med["full"][0], 3),
              "policy_flat": round(med["policy"][-1] / med["policy"][0], 3),
              "policy_vs_full_last": round(med["policy"][-1] / med["full"][-1], 3),
              "rounds": args.rounds, "machine": machine()})
    finally:
        model.close()
    return 0
