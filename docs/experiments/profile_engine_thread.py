"""cProfile of the engine thread while it decodes after a prefix hit (what `bench decode --contexts` times).

Not a shipped command (issue #20 item 1's profile). Cold-prefills a --context prompt, then submits it again (a
prefix hit: the last block is recomputed) and profiles `Engine.step` on the engine thread for that request:
the first step (the hit's prefill) separately from the decode steps. Also profiles the engine thread's handling of the
request's admission. Prints the top functions by own time and
cumulative time, and the decode steps' wall time split into Python (building, bookkeeping) and waiting for
MLX (`tolist` of the in-flight tokens).

    .venv/bin/python docs/experiments/profile_engine_thread.py --context 2048 --tokens 32
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
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--suffix", type=int, default=0,
                    help="profile prefix + a new suffix of this many tokens (bench prefix's hit) instead")
    args = ap.parse_args()

    from zkv_mlx import ZKV
    from zkv_mlx.bench.common import bench_tokens
    from zkv_mlx.engine.engine import Engine
    from zkv_mlx.engine.thread import EngineThread

    model = ZKV(max_context=args.context + 2 * args.suffix + args.tokens + 64, ssd_cache="off")
    text = bench_tokens(model.tokenizer, args.context + 2 * args.suffix)
    prompt = text[:args.context]
    cold = text[:args.context + args.suffix]
    if args.suffix:
        prompt = prompt + text[args.context + args.suffix:]
    list(model.submit(cold, temperature=0.0, max_tokens=2, ignore_eos=True))  # cold prefill

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

    orig_handle = EngineThread._handle

    def handle(self, eng, cmd):  # admission of the request (hashing its blocks) happens here
        prof.enable()
        try:
            return orig_handle(self, eng, cmd)
        finally:
            prof.disable()

    Engine.step = step
    EngineThread._handle = handle
    t0 = time.perf_counter()
    times = []
    for ev in model.submit(prompt, temperature=0.0, max_tokens=args.tokens, ignore_eos=True):
        if ev.kind == "token":
            times.append(time.perf_counter())
    Engine.step = orig
    EngineThread._handle = orig_handle
    model.close()
    print(f"first token {times[0] - t0:.3f} s; decode {(len(times) - 1) / (times[-1] - times[0]):.2f} tok/s; "
          f"steps {len(steps)}: first {steps[0] * 1e3:.1f} ms, median of the rest "
          f"{sorted(steps[1:])[len(steps[1:]) // 2] * 1e3:.1f} ms")
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(args.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
