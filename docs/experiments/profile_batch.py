"""cProfile of the engine thread during `bench batch`'s batched round (8 concurrent greedy streams).

Not a shipped command (issue #20 item 3). Runs the bench's own round (one thread per stream, 32-token prompts,
--tokens each) once to warm up, then once with `Engine.step` profiled; prints the step times (steps with all
streams decoding) and the top functions by own and cumulative time.

    .venv/bin/python docs/experiments/profile_batch.py --streams 8 --tokens 64
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import zkv_mlx  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()

    from zkv_mlx import ZKV
    from zkv_mlx.bench.batch import _round
    from zkv_mlx.bench.common import bench_tokens
    from zkv_mlx.engine.engine import Engine

    # a pool for every stream, as `bench batch` sizes it (w/batch8): the "dynamic" default holds four contexts
    model = ZKV(max_context=32 + args.tokens + 16, max_num_seqs=16, kv_cache_memory="256MB")
    text = bench_tokens(model.tokenizer, 32 * args.streams * 2)
    prompts = [text[i * 32:(i + 1) * 32] for i in range(args.streams * 2)]
    _round(model, prompts[:args.streams], 8)
    prof = cProfile.Profile()
    steps: list[float] = []
    orig = Engine.step

    def step(self):
        t0 = time.perf_counter()
        prof.enable()
        try:
            return orig(self)
        finally:
            prof.disable()
            steps.append(time.perf_counter() - t0)

    Engine.step = step
    rate, _ = _round(model, prompts[args.streams:], args.tokens)
    Engine.step = orig
    model.close()
    s = sorted(steps)
    print(f"batched decode {rate:.2f} tok/s; {len(steps)} steps, median {s[len(s) // 2] * 1e3:.1f} ms")
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(args.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
