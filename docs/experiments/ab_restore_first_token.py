"""A/B in one process: the first token after a session restore vs after a memory prefix hit of the same prompt.

Not a shipped command (issue #20 item 3, "the first token after a restore no slower than after a memory prefix
hit of the same length"). `zkv-mlx bench restore` measures both once per round, next to a long recompute whose
noise on a shared machine swamps a 0.1 s difference; this cold-prefills the --tokens prompt once, saves it as a
session file, then for --rounds rounds: clears the prefix cache, restores the file (`load_session`) and times

- restore: the first token right after the restore;
- hit: the same prompt again at once (its blocks now in memory: a memory prefix hit of the same length);
- hit-idle: the same prompt again after --idle seconds of sleep (a memory hit after an idle pause like the one
  a restore's file read leaves the model's threads in);

and prints medians, with the prompt tokens each first token found cached (the same path must be taken: all but
the last token) and the seconds Python's garbage collector ran during each (gc_s). --recompute adds, before each
round, what `bench restore` does there: a cold recompute of the prompt and a read of the file.

    .venv/bin/python docs/experiments/ab_restore_first_token.py --tokens 4096 --rounds 9
    .venv/bin/python docs/experiments/ab_restore_first_token.py --tokens 2048 --rounds 5 --recompute
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path


_GC = {"t0": 0.0, "total": 0.0}


def _gc_clock(phase, info) -> None:
    # seconds spent in Python's cyclic garbage collector (any thread), summed
    if phase == "start":
        _GC["t0"] = time.perf_counter()
    else:
        _GC["total"] += time.perf_counter() - _GC["t0"]


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
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--idle", type=float, default=0.05)
    ap.add_argument("--recompute", action="store_true", help="as `bench restore` does: a cold recompute of the "
                    "prompt and a read of the file before each round's restore")
    args = ap.parse_args()

    from zkv_mlx import ZKV
    from zkv_mlx.bench.common import bench_tokens, machine
    from zkv_mlx.session import Session
    from zkv_mlx.storage import session_file

    model = ZKV(max_context=args.tokens + 64, ssd_cache="off")
    ids = bench_tokens(model.tokenizer, args.tokens)
    tmp = Path(tempfile.mkdtemp(prefix="zkv-ab-first-"))
    f = tmp / "ab.zkvs"
    times: dict[str, list[float]] = {"load": [], "restore": [], "hit": [], "hit-idle": []}
    gc_s: dict[str, list[float]] = {k: [] for k in times}
    gc.callbacks.append(_gc_clock)
    cached: dict[str, set] = {k: set() for k in ("restore", "hit", "hit-idle")}
    try:
        cold, _ = _first_token(model, ids)
        Session(model, "ab", "local", [], ids).save(f)
        for _ in range(args.rounds):
            model.clear_kv_cache()
            if args.recompute:
                _first_token(model, ids)
                model.clear_kv_cache()
                session_file.read(f)
            g0, t0 = _GC["total"], time.perf_counter()
            s = model.load_session(str(f))
            times["load"].append(time.perf_counter() - t0)
            gc_s["load"].append(_GC["total"] - g0)
            for kind in ("restore", "hit", "hit-idle"):
                if kind == "hit-idle":
                    time.sleep(args.idle)
                g0 = _GC["total"]
                t, c = _first_token(model, ids)
                times[kind].append(t)
                gc_s[kind].append(_GC["total"] - g0)
                cached[kind].add(c)
            model.close_session(s.name)
    finally:
        model.close()
        f.unlink(missing_ok=True)
        tmp.rmdir()
    print(json.dumps({
        "tokens": args.tokens, "rounds": args.rounds, "idle_s": args.idle, "recompute": args.recompute,
        "cold_s": round(cold, 3),
        "median_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "per_round_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "gc_s": {k: [round(x, 4) for x in v] for k, v in gc_s.items()},
        "cached_tokens": {k: sorted(v) for k, v in cached.items()}, "machine": machine(),
    }))


if __name__ == "__main__":
    main()
