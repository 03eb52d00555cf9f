"""One rank of `zkv-mlx bench distributed`'s N-rank job:
`python -m zkv_mlx.bench.distributed_job SETTINGS.json [--rounds N]` (SETTINGS: a file, or the JSON itself).

Rank 0 reads commands from stdin ("round" or "quit") and answers each round with one JSON line on stdout:
decode tokens/s, and per decode step the collectives of the model (count, payload bytes) and of the plan; with
`--rounds N` (a run by hand under mlx.launch) it runs N rounds without reading stdin. Ranks > 0 serve rank 0's
plans inside `ZKV(...)` and exit when it closes. A start failure is one line on stderr (exit 1).
"""

from __future__ import annotations

import json
import sys

import zkv_mlx  # noqa: F401  (OpenBLAS before mlx.core)


class CollectiveCounter:
    """Counts mx.distributed collectives as they are put into graphs (mlx.nn's sharded layers and mlx-lm's MoE
    call `mx.distributed.all_sum` by attribute, so a wrapper sees every one)."""

    def __init__(self):
        import mlx.core as mx

        self.calls = self.bytes = 0
        for name in ("all_sum", "all_gather"):
            orig = getattr(mx.distributed, name)
            setattr(mx.distributed, name, self._wrap(orig))

    def _wrap(self, orig):
        def counted(x, *args, **kwargs):
            self.calls += 1
            self.bytes += x.nbytes
            return orig(x, *args, **kwargs)

        return counted


def timed_round(model, prompt: list[int], tokens: int) -> tuple[float, int]:
    """Decode tokens/s of one greedy request (first token excluded: it ends the prefill) and tokens decoded."""
    import time

    times = []
    for ev in model.submit(prompt, temperature=0.0, max_tokens=tokens, ignore_eos=True):
        if ev.kind == "error":
            raise ev.error
        if ev.kind == "token":
            times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0]), len(times) - 1


def main() -> int:
    import argparse
    import os
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m zkv_mlx.bench.distributed_job")
    p.add_argument("settings", help="the settings file `zkv-mlx bench distributed` wrote, or its JSON")
    p.add_argument("--rounds", type=int, default=None, help="run this many rounds without reading stdin")
    a = p.parse_args()
    settings = json.loads(Path(a.settings).read_text() if os.path.isfile(a.settings) else a.settings)
    counter = CollectiveCounter()
    from zkv_mlx import ZKV
    from zkv_mlx.distributed import current_group, rank_line
    from zkv_mlx.errors import ZkvError

    try:
        model = ZKV(settings.pop("model"), distributed=True, **settings.pop("engine"))  # ranks > 0 stay inside
    except ZkvError as e:  # one line, as the CLI prints it (the other ranks say why they end, too)
        print(rank_line(0, e), file=sys.stderr, flush=True)
        return 1
    group = current_group()
    prompt, tokens = settings["prompt"], settings["tokens"]
    timed_round(model, prompt[:16], 4)  # warm-up
    commands = ["round"] * a.rounds if a.rounds is not None else sys.stdin
    for line in commands:
        if line.strip() != "round":
            break
        # a prefill-only request, then the measured one: their difference is what the decode steps sent
        counts = []
        for n in (1, tokens):
            c0, b0, p0, m0 = counter.calls, counter.bytes, group.bytes_sent, group.collectives
            tok_s, steps = timed_round(model, prompt, n) if n > 1 else (0.0, 0)
            if n == 1:
                for _ in model.submit(prompt, temperature=0.0, max_tokens=1):
                    pass
            plan_b, plan_c = group.bytes_sent - p0, group.collectives - m0
            counts.append((counter.calls - c0 - plan_c, counter.bytes - b0 - plan_b, plan_c, plan_b))
        # decode forwards: one more than tokens decoded, as decode is pipelined (the step after the last token is
        # computed, then dropped)
        forwards = steps + 1
        d = [(b - a) / forwards for a, b in zip(*counts)]
        print(json.dumps({"tok_s": tok_s, "steps": steps, "decode_forwards": forwards, "model_collectives_per_step": d[0],
                          "model_bytes_per_step": d[1], "plan_collectives_per_step": d[2],
                          "plan_bytes_per_step": d[3]}), flush=True)
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
