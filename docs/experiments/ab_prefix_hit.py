"""A/B in one engine: time to the first token of a prefix hit plus a new suffix, old path vs new path.

Not a shipped command (issue #20: `bench prefix`'s hit). Cold-prefills --prefix-tokens + --suffix-tokens once,
then alternates prompts of the same cached prefix plus a suffix never seen before (so each one hits exactly the
prefix and prefills --suffix-tokens new tokens, as `bench prefix`'s hit does) with
`models.attention.CHUNK_MAX_QUERIES = 1` ("old": the chunk gathers the context per layer for the tiled path, as
before w/prefixhit) and the default ("new": `prefill_cpu.paged_chunk_attention` over the pool). Prints the
medians and every round. (The two paths' numbers are compared in `ab_suffix_chunk.py`: bitwise equal logits.)

    .venv/bin/python docs/experiments/ab_prefix_hit.py --prefix-tokens 4096 --suffix-tokens 32 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import zkv_mlx  # noqa: F401


def _first_token(model, ids) -> tuple[float, int]:
    t0 = time.perf_counter()
    first, cached = None, 0
    for ev in model.submit(ids, temperature=0.0, max_tokens=1, ignore_eos=True):
        if ev.kind == "error":
            raise ev.error
        if first is None and ev.kind in ("token", "done"):
            first = time.perf_counter() - t0
        if ev.kind == "done":
            cached = ev.usage.get("cached_tokens", 0)
    return first, cached


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix-tokens", type=int, default=4096)
    ap.add_argument("--suffix-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from zkv_mlx import ZKV
    from zkv_mlx.bench.common import bench_tokens
    from zkv_mlx.models import attention

    p, s = args.prefix_tokens, args.suffix_tokens
    n_suffixes = 2 * args.rounds + 1
    model = ZKV(max_context=p + s + 64, ssd_cache="off")
    text = bench_tokens(model.tokenizer, p + n_suffixes * s)
    prefix = text[:p]
    suffixes = [text[p + i * s: p + (i + 1) * s] for i in range(n_suffixes)]
    t0 = time.perf_counter()
    _first_token(model, prefix + suffixes[0])
    cold = time.perf_counter() - t0
    paths = {"old": 1, "new": attention.CHUNK_MAX_QUERIES}
    res = {name: [] for name in paths}
    cached = set()
    i = 1
    for _ in range(args.rounds):
        for name, limit in paths.items():
            attention.CHUNK_MAX_QUERIES = limit  # read by the engine thread at its next forward
            t, c = _first_token(model, prefix + suffixes[i])
            i += 1
            res[name].append(t)
            cached.add(c)
        print(json.dumps({name: round(v[-1], 4) for name, v in res.items()}), flush=True)
    model.close()
    out = {"prefix_tokens": p, "suffix_tokens": s, "rounds": args.rounds, "cold_s": round(cold, 3),
           "hit_cached_tokens": sorted(cached), "load_avg_1min": round(os.getloadavg()[0], 2)}
    out.update({f"{name}_hit_s": round(statistics.median(v), 4) for name, v in res.items()})
    out["old_over_new"] = round(statistics.median(res["old"]) / statistics.median(res["new"]), 2)
    out["cold_over_new"] = round(cold / statistics.median(res["new"]), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
