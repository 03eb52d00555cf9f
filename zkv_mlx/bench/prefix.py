"""`zkv-mlx bench prefix`: time to first token for a cold prompt vs one sharing a cached prefix.

Each round clears the prefix cache, sends prefix + suffix A (a miss), then prefix + suffix B (a hit on the prefix);
rounds alternate the two measurements in one process. Last line:
{"prefix_tokens", "miss_ttft_s", "hit_ttft_s", "speedup", "hit_tokens"} (medians).
"""

from __future__ import annotations

import time

from .common import bench_tokens, emit, log, machine, median


def ttft(model, ids: list[int]) -> tuple[float, int]:
    """Seconds to the first token, and the prompt tokens served from the cache."""
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


def run(args) -> int:
    from ..cli_common import open_model

    if args.max_context is None:
        args.max_context = args.prefix_tokens + 2 * args.suffix_tokens + 64
    # Cold figures must be cold: the SSD tier would serve the "cleared" blocks back from disk.
    if args.ssd_cache is None:
        args.ssd_cache = "off"
    log(args, "loading zkv engine...")
    model = open_model(args)
    text = bench_tokens(model.tokenizer, args.prefix_tokens + 2 * args.suffix_tokens)
    prefix = text[: args.prefix_tokens]
    suffix_a = text[args.prefix_tokens: args.prefix_tokens + args.suffix_tokens]
    suffix_b = text[args.prefix_tokens + args.suffix_tokens:]
    ttft(model, text[:64])  # warm-up
    misses, hits, hit_tokens = [], [], []
    for r in range(args.rounds):
        model.clear_kv_cache()
        m, cached_miss = ttft(model, prefix + suffix_a)
        h, cached_hit = ttft(model, prefix + suffix_b)
        misses.append(m)
        hits.append(h)
        hit_tokens.append(cached_hit)
        row = {"round": r, "miss_ttft_s": round(m, 4), "hit_ttft_s": round(h, 4), "miss_cached_tokens": cached_miss,
               "hit_tokens": cached_hit}
        emit(row) if args.json else log(args, str(row))
    model.close()
    result = {
        "prefix_tokens": args.prefix_tokens,
        "suffix_tokens": args.suffix_tokens,
        "rounds": args.rounds,
        "miss_ttft_s": round(median(misses), 4),
        "hit_ttft_s": round(median(hits), 4),
        "speedup": round(median(misses) / median(hits), 1),
        "hit_tokens": int(median(hit_tokens)),
        "machine": machine(),
    }
    emit(result)
    return 0
