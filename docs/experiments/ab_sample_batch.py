"""A/B in one process: sampling B rows of the bundled model's vocabulary with per-row graphs (the sampler before
w/batch8, `mx.random.categorical` per row) vs one graph for the batch (`engine.sampler.sample_lazy` now).

Not a shipped command (issue #20 item 4, w/batch8). Random float32 logits [B, 49152]; each call builds the
graph for the batch and evaluates it; the two alternate, medians of --reps. Prints ms per call (build +
evaluation) and the Python graph-building time alone, for greedy, temperature-only and top-p + top-k rows.

    .venv/bin/python docs/experiments/ab_sample_batch.py --batch 8 --reps 15
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import zkv_mlx  # noqa: F401
import mlx.core as mx


def _per_row(logits: mx.array, seqs) -> mx.array:
    """The sampler before w/batch8: a graph per sampled row, stacked."""
    from zkv_mlx.engine.sampler import GREEDY_BELOW, NO_TOKEN, _argmax, _clean, _key, _valid

    logits = _clean(logits)
    if all(s.params.temperature < GREEDY_BELOW for s in seqs):
        return _argmax(logits)
    neg = mx.array(-math.inf)
    out = []
    for i, seq in enumerate(seqs):
        row, p = logits[i], seq.params
        if p.temperature < GREEDY_BELOW:
            out.append(_argmax(row))
            continue
        top = row.max()
        has_inf = top == math.inf
        x = mx.where(has_inf, mx.where(row == math.inf, 0.0, -math.inf), row - mx.where(has_inf, 0.0, top))
        x = x / p.temperature
        if p.top_k and p.top_k < x.shape[-1]:
            x = mx.where(x < mx.sort(x)[-p.top_k], neg, x)
        if p.top_p < 1.0:
            order = mx.argsort(-x)
            sp = mx.softmax(x[order])
            keep_sorted = (mx.cumsum(sp) - sp) < p.top_p
            keep_sorted[0] = True
            keep = mx.zeros(x.shape, dtype=mx.bool_)
            keep[order] = keep_sorted
            x = mx.where(keep, x, neg)
        token = mx.random.categorical(x, key=_key(seq)).astype(mx.int32)
        out.append(mx.where(_valid(row), token, NO_TOKEN))
    return mx.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()

    from zkv_mlx.engine.sampler import sample_lazy
    from zkv_mlx.engine.sequence import SamplingParams, Sequence

    logits = mx.random.normal((args.batch, 49152)) * 4
    mx.eval(logits)
    cases = {"greedy": dict(temperature=0.0), "temperature": dict(temperature=0.7),
             "top_p_top_k": dict(temperature=0.7, top_p=0.9, top_k=40)}
    out = {"batch": args.batch, "reps": args.reps}
    for name, kw in cases.items():
        seqs_old = [Sequence(prompt_ids=[1], params=SamplingParams(seed=i, **kw)) for i in range(args.batch)]
        seqs_new = [Sequence(prompt_ids=[1], params=SamplingParams(seed=i, **kw)) for i in range(args.batch)]
        t = {"old": [], "new": [], "old_build": [], "new_build": []}
        for r in range(args.reps + 1):
            for side, fn, seqs in (("old", _per_row, seqs_old), ("new", sample_lazy, seqs_new)):
                t0 = time.perf_counter()
                y = fn(logits, seqs)
                t1 = time.perf_counter()
                got = y.tolist()
                if r:  # the first call of each side warms up
                    t[side].append(time.perf_counter() - t0)
                    t[side + "_build"].append(t1 - t0)
                if side == "old":
                    old_tokens = got
                else:
                    assert got == old_tokens, (name, got, old_tokens)  # same seeds, same tokens
        out[name] = {k + "_ms": round(statistics.median(v) * 1e3, 3) for k, v in t.items()}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
