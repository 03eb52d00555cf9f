"""Where the engine loop's per-token time goes, between the runner's step and `bench decode` (issue #20).

Not a shipped command. One process, the bundled model, the engine opened as `zkv-mlx bench decode --contexts
2048,4096,8192` opens it (prefix cache on, SSD off, max_context 8224, so the same pool size). After one cold
prefill of a --context prompt, each round runs these ways of decoding --tokens tokens after it, alternating, and
reports per way the median over rounds of the median interval between consecutive tokens (ms/token):

- mlx: mlx-lm's `generate_step` on its own prompt cache (the bench's `_MlxLm.decode`);
- bench: `ZKV.submit` of the prompt again (prefix hit), tokens read on this thread (the bench's `_zkv_decode`);
- engine: the same request stepped with `Engine.step` on the engine thread (no queue, no consumer thread), each
  phase of the step timed (ms per decode step, medians);
- runner: a bare pipelined loop on the engine's runner (`ModelRunner.decode` -> argmax -> `mx.async_eval`, the
  previous token's `.item()`), generate_step's structure without the engine around it;
- runner_sync: the same step evaluated synchronously (build + compute, no overlap).

A way named `<way>@old` runs with w/decode9's decode-step changes switched off (every rope call through
`mx.fast.rope`, every norm through `mx.fast.rms_norm`, as before models/step_rope.py and models/fused_norm.py,
and `Engine._register` looking up the prefix cache after every token, as before); `<way>@rope` switches off only the rope table, `<way>@norm` only
the fused norm, `<way>@register` only the `_register` early exit: A/B in one process. (The K/V-row reshape
without a transpose stays on in every way.)

    flock -x /tmp/s9/cpu.lock nice -n -20 .venv/bin/python docs/experiments/engine_loop_phases.py --context 2048
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections import defaultdict

import zkv_mlx  # noqa: F401  (loads OpenBLAS before MLX)
import mlx.core as mx


def _intervals(times: list[float]) -> float:
    return 1e3 * statistics.median(b - a for a, b in zip(times, times[1:]))


class _Seq:
    """The fields `ModelRunner.decode` reads from a Sequence (context fixed: the same row rewritten)."""

    def __init__(self, n: int, block_table: list[int]):
        self.all_ids, self.num_tokens, self.dropped = [1] * n, n, 0
        self.block_table, self.state, self.is_finished, self.policy = block_table, [], False, None


class Phases:
    """Wraps callables and sums their wall time per name for the current step."""

    def __init__(self):
        self.cur: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.undo: list = []

    def wrap(self, owner, name: str, label: str | None = None) -> None:
        orig = getattr(owner, name)
        label = label or name
        cur = self.cur

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                cur[label] += time.perf_counter() - t0

        setattr(owner, name, timed)
        self.undo.append((owner, name, orig))

    def restore(self) -> None:
        for owner, name, orig in reversed(self.undo):
            setattr(owner, name, orig)
        self.undo.clear()


def engine_round(eng, prompt: list[int], tokens: int) -> tuple[list[float], dict]:
    """Steps one request to its end on the engine thread, timing the phases of every step."""
    from zkv_mlx.engine import engine as engine_mod
    from zkv_mlx.engine.sequence import SamplingParams

    ph = Phases()
    times: list[float] = []

    def listener(ev):
        if ev.kind == "token":
            times.append(time.perf_counter())

    seq = eng.add_request(prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), "local",
                          listener)
    ph.wrap(eng.prefix, "trim")
    ph.wrap(eng, "_apply_policies")
    ph.wrap(eng.scheduler, "schedule")
    ph.wrap(eng.tiers, "flush_staged")
    ph.wrap(eng.runner, "decode", "runner.decode (graph build)")
    ph.wrap(engine_mod, "sample_lazy", "sample_lazy (build)")
    ph.wrap(engine_mod.mx, "async_eval", "mx.async_eval")
    ph.wrap(eng, "_resolve", "_resolve (wait + postprocess)")
    ph.wrap(eng.out, "postprocess", "postprocess (detok, events, register)")
    gc_t = [0.0]

    def gc_cb(phase, info):
        if phase == "start":
            gc_t.append(time.perf_counter())
        else:
            ph.cur["gc"] += time.perf_counter() - gc_t.pop()

    gc.callbacks.append(gc_cb)
    try:
        while not seq.is_finished or eng.has_work():
            ph.cur.clear()
            t0 = time.perf_counter()
            eng.step()
            ph.cur["step total"] = time.perf_counter() - t0
            ph.steps.append(dict(ph.cur))
    finally:
        gc.callbacks.remove(gc_cb)
        ph.restore()
    # the first step is the hit's 1-token prefill, the last ones drain the pipeline
    dec = ph.steps[1:-1]
    keys = sorted({k for s in dec for k in s})
    return times, {k: round(1e3 * statistics.median(s.get(k, 0.0) for s in dec), 2) for k in keys}


def runner_round(eng, prompt: list[int], tokens: int, sync: bool) -> list[float]:
    """A bare decode loop on the engine's runner over the prompt's blocks (generate_step's structure)."""
    from zkv_mlx.engine.sequence import SamplingParams

    seq = eng.add_request(prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), "local",
                          lambda ev: None)
    eng.step()  # the hit: the last block copied into the request's own block, its last token computed
    eng._resolve()
    fs = _Seq(len(prompt), list(seq.block_table))  # rewrites row len(prompt) - 1 of its own block every step
    r = eng.runner
    times: list[float] = []
    if sync:
        for _ in range(tokens):
            y = mx.argmax(r.decode([fs]), axis=-1)
            y.item()
            times.append(time.perf_counter())
    else:
        y = mx.argmax(r.decode([fs]), axis=-1)
        mx.async_eval(y)
        for _ in range(tokens):
            ny = mx.argmax(r.decode([fs], y), axis=-1)
            mx.async_eval(ny)
            y.item()
            times.append(time.perf_counter())
            y = ny
        y.item()
    eng.cancel(seq)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-context", type=int, default=8192 + 16 + 16)
    ap.add_argument("--ways", default="mlx,bench,engine,runner,runner_sync")
    args = ap.parse_args()

    from zkv_mlx import ZKV
    from zkv_mlx.bench.common import bench_tokens
    from zkv_mlx.bench.decode_contexts import _MlxLm, _timed
    from zkv_mlx.models.loader import load_model

    model = ZKV(max_context=args.max_context, ssd_cache="off", prompt_cache=True)
    ref = _MlxLm(load_model(None, model.config.weights_dtype).model)
    prompt = bench_tokens(model.tokenizer, args.context)
    list(model.submit(prompt, temperature=0.0, max_tokens=2, ignore_eos=True))  # cold prefill: blocks cached
    ref.cold(prompt, 2)
    ways = args.ways.split(",")
    per: dict[str, list[float]] = defaultdict(list)
    phases: dict[str, list[dict]] = {}

    def mlx_way():
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import trim_prompt_cache

        trim_prompt_cache(ref.cache, ref.cache[0].offset - (ref.n - 1))
        return _timed(generate_step(mx.array([ref.last]), ref.model, max_tokens=args.tokens,
                                    prompt_cache=ref.cache))[1]

    from zkv_mlx.models import fused_norm, step_rope

    new_rope, new_norm = step_rope.StepRoPE.__call__, fused_norm.DecodeRMSNorm.__call__

    def old_rope(self, x, offset=0, *a, **k):
        return self.inner(x, offset, *a, **k)

    def old_norm(self, x):
        return self.inner(x)

    from zkv_mlx.engine.engine import Engine

    new_register = Engine._register

    def old_register(self, seq):  # before w/decode9: the block lookup after every token
        if seq.dropped:
            return
        self.blocks.register_full_blocks(seq, min(seq.num_computed, len(seq.all_ids)))
        if self.snapshots is not None:
            self.snapshots.publish(seq)

    import types

    eng = model._thread.engine

    def switch(old: str) -> None:
        # Outputs keeps the bound method it was built with
        eng.out._register = types.MethodType(old_register if old in ("old", "register") else new_register, eng)
        step_rope.StepRoPE.__call__ = old_rope if old in ("old", "rope") else new_rope
        fused_norm.DecodeRMSNorm.__call__ = old_norm if old in ("old", "norm") else new_norm

    for r in range(args.rounds):
        for label in ways:
            way, _, old = label.partition("@")
            switch(old)
            if way == "mlx":
                times = mlx_way()
            elif way == "bench":
                times = _timed(model.submit(prompt, temperature=0.0, max_tokens=args.tokens, ignore_eos=True))[1]
            elif way == "engine":
                times, ph = model._thread.call(engine_round, prompt, args.tokens)
                phases.setdefault(label, []).append(ph)
            else:
                times = model._thread.call(runner_round, prompt, args.tokens, way == "runner_sync")
            per[label].append(_intervals(times))
        switch("")
        print(json.dumps({"round": r, **{w: round(v[-1], 2) for w, v in per.items()}}), flush=True)
    out = {"context": args.context, "tokens": args.tokens, "rounds": args.rounds,
           "ms_per_token": {w: round(statistics.median(v), 2) for w, v in per.items()}}
    if "mlx" in per:
        out["ratio_vs_mlx"] = {w: round(statistics.median(per["mlx"]) / statistics.median(v), 3)
                               for w, v in per.items() if w != "mlx"}
    for label, ph in phases.items():
        out[f"{label}_step_phases_ms"] = {k: statistics.median(p.get(k, 0.0) for p in ph) for k in ph[0]}
    print(json.dumps(out), flush=True)
    model.close()


if __name__ == "__main__":
    main()
