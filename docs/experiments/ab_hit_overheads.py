"""A/B in one process: a prefix hit's 32-token chunk, `paged_chunk_attention` of two commits (or one and this tree).

Not a shipped command (issue #20, w/prefix9: the prefix bench's hit). Each commit's
`zkv_mlx/kernels/prefill_cpu.py` is loaded from git (`git show COMMIT:...`) as a module of its own and swapped in
for `models.attention.paged_chunk_attention`, alternating round by round. (The variants of w/prefix9 that were
not kept, with their switches, are in commit 047b806's copy of this script.)

--mode forward: the bundled model's `ModelRunner.prefill` of --suffix tokens over --context random cached rows
(a pool of 1060 blocks, as `bench prefix --prefix-tokens 4096` sizes it), whole forward timed; also each
variant's attention alone, each layer synced before and after ("attn", summed over the layers).
--mode engine: one engine (as `bench prefix`), one cold prefill of --context + --suffix tokens, then prompts of
the cached --context tokens plus a suffix never seen before (each hits exactly --context tokens): time to the
first token, old / new alternating. Medians of --rounds; prints every round and the load.

    .venv/bin/python docs/experiments/ab_hit_overheads.py --old 4c0cc82 --mode forward --rounds 9
    .venv/bin/python docs/experiments/ab_hit_overheads.py --old 4c0cc82 --mode engine --rounds 7
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zkv_mlx  # noqa: F401  (loads OpenBLAS before MLX)
import mlx.core as mx

ROOT = Path(__file__).resolve().parents[2]


def _old_module(commit: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:zkv_mlx/kernels/prefill_cpu.py"],
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "prefill_cpu_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("prefill_cpu_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Seq:
    """The fields `ModelRunner.prefill` reads from a Sequence."""

    def __init__(self, n: int, block_table: list[int]):
        self.all_ids = [(7 * i) % 1000 + 1 for i in range(n)]
        self.num_tokens = n
        self.dropped = 0
        self.block_table = block_table
        self.state = []
        self.is_finished = False
        self.policy = None


def _forward(args, variants) -> dict:
    from zkv_mlx.engine.runner import ModelRunner
    from zkv_mlx.models import attention, paged
    from zkv_mlx.models.loader import load_model

    lm = load_model(None, "float32")
    ctx, L, bs = args.context, args.suffix, 16
    nb = -(-(ctx + L) // bs)
    runner = ModelRunner(lm, 1060, bs, lm.dtype)
    pool = runner.pool
    for i in range(lm.n_layers):
        pool.k[i] = mx.random.normal(pool.k[i].shape).astype(lm.dtype)
        pool.v[i] = mx.random.normal(pool.v[i].shape).astype(lm.dtype)
    mx.eval(pool.k, pool.v)
    seq = _Seq(ctx + L, list(range(1, nb + 1)))
    attend, acc = paged.attend, {"attn": 0.0}

    def timed_attend(q, layer, meta, scale, **kw):
        mx.eval(q)
        t0 = time.perf_counter()
        out = attend(q, layer, meta, scale, **kw)
        mx.eval(out)
        acc["attn"] += time.perf_counter() - t0
        return out

    res = {name: {"forward": [], "attn": []} for name in variants}
    logits = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, fn in variants.items():
            attention.paged_chunk_attention = fn
            t0 = time.perf_counter()
            out = runner.prefill(seq, ctx, ctx + L)
            mx.eval(out)
            t = time.perf_counter() - t0
            logits[name] = out
            paged.attend = timed_attend
            acc["attn"] = 0.0
            mx.eval(runner.prefill(seq, ctx, ctx + L))
            paged.attend = attend
            if r:
                res[name]["forward"].append(t)
                res[name]["attn"].append(acc["attn"])
    out = {name: {k: round(1e3 * statistics.median(v), 1) for k, v in row.items()} for name, row in res.items()}
    for name in res:
        out[f"old_over_{name}_forward"] = round(out["old"]["forward"] / out[name]["forward"], 3)
        out[f"logits_max_abs_diff_old_{name}"] = mx.abs(logits["old"] - logits[name]).max().item()
    return out


def _engine(args, variants) -> dict:
    from zkv_mlx import ZKV
    from zkv_mlx.bench.common import bench_tokens
    from zkv_mlx.bench.prefix import ttft
    from zkv_mlx.models import attention

    p, s = args.context, args.suffix
    n_suffixes = len(variants) * (args.rounds + 1) + 1
    model = ZKV(max_context=p + 2 * s + 64, ssd_cache="off")
    text = bench_tokens(model.tokenizer, p + n_suffixes * s)
    prefix, suffixes = text[:p], [text[p + i * s: p + (i + 1) * s] for i in range(n_suffixes)]
    ttft(model, text[:64])
    cold = ttft(model, prefix + suffixes[0])[0]
    res = {name: [] for name in variants}
    i = 1
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, fn in variants.items():
            attention.paged_chunk_attention = fn  # read by the engine thread at its next forward
            t, cached = ttft(model, prefix + suffixes[i])
            i += 1
            assert cached == p, cached
            if r:
                res[name].append(t)
        print(json.dumps({name: round(v[-1], 4) for name, v in res.items() if r}), flush=True)
    model.close()
    out = {"cold_s": round(cold, 3)}
    out.update({f"{name}_hit_s": round(statistics.median(v), 4) for name, v in res.items()})
    for name in res:
        out[f"old_over_{name}"] = round(statistics.median(res["old"]) / statistics.median(res[name]), 3)
    out["cold_over_new"] = round(cold / statistics.median(res["new"]), 1)
    out["cold_over_old"] = round(cold / statistics.median(res["old"]), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="commit whose prefill_cpu.py is the 'old' variant")
    ap.add_argument("--mode", choices=["forward", "engine"], default="forward")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new", default=None, help="commit whose prefill_cpu.py is the 'new' variant (default: this tree)")
    args = ap.parse_args()
    from zkv_mlx.kernels import prefill_cpu

    old = _old_module(args.old).paged_chunk_attention
    new = _old_module(args.new).paged_chunk_attention if args.new else prefill_cpu.paged_chunk_attention
    variants = {"old": old, "new": new}
    load0 = os.getloadavg()[0]
    out = _forward(args, variants) if args.mode == "forward" else _engine(args, variants)
    head = {"mode": args.mode, "old": args.old, "context": args.context, "suffix": args.suffix,
            "rounds": args.rounds, "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    print(json.dumps({**head, **out}))


if __name__ == "__main__":
    sys.exit(main())
