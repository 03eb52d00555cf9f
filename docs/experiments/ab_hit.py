"""A/B in one process: the first token of a prompt whose blocks are all cached, old way vs new way.

Not a shipped command (issue #20 item 2). Cold-prefills a --tokens prompt (a multiple of the block size), then
alternates re-submitting it with the engine's last-block hit off ("old": the prefix cache hands out every block
but the last, whose block_size tokens are recomputed as a prefill chunk) and on ("new": the last block's K/V are
copied from the cached block and only the last token is computed, `Engine._hit_last_block`). Prints the medians
of the time to the first token.

    .venv/bin/python docs/experiments/ab_hit.py --tokens 4096 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import zkv_mlx  # noqa: F401


def _first_token(model, ids) -> tuple[float, int]:
    t0 = time.perf_counter()
    cached = 0
    for ev in model.submit(ids, temperature=0.0, max_tokens=1, ignore_eos=True):
        if ev.kind == "error":
            raise ev.error
        if ev.kind == "done":
            cached = ev.usage.get("cached_tokens", 0)
    return time.perf_counter() - t0, cached


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from zkv_mlx import ZKV
    from zkv_mlx.bench.common import bench_tokens

    model = ZKV(max_context=args.tokens + 64, ssd_cache="off")
    ids = bench_tokens(model.tokenizer, args.tokens)
    t0 = time.perf_counter()
    _first_token(model, ids)
    cold = time.perf_counter() - t0
    hook = model._thread.call(lambda eng: eng.scheduler.extend_hit)

    def set_hook(value):
        def fn(eng):
            eng.scheduler.extend_hit = value
        model._thread.call(fn)

    res = {"old": [], "new": []}
    cached = {}
    for _ in range(args.rounds):
        for name, value in (("old", None), ("new", hook)):
            set_hook(value)
            t, c = _first_token(model, ids)
            res[name].append(t)
            cached[name] = c
    set_hook(hook)
    model.close()
    print(json.dumps({"tokens": args.tokens, "cold_s": round(cold, 3),
                      "old_hit_s": round(statistics.median(res["old"]), 4),
                      "new_hit_s": round(statistics.median(res["new"]), 4),
                      "old_cached_tokens": cached["old"], "new_cached_tokens": cached["new"],
                      "old_rounds": [round(x, 3) for x in res["old"]], "new_rounds": [round(x, 3) for x in res["new"]]}))


if __name__ == "__main__":
    main()
