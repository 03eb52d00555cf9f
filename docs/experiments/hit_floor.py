"""What bounds a prefix hit's first token: the 32-token forward without its long attention, plus the attention's
two GEMMs alone. Not a shipped command (issue #20, w/prefix9: can the hit be 100x faster than the cold prefill?).

In one process, alternating, medians of --rounds (ms): "hit" the bundled model's `ModelRunner.prefill` of
--suffix tokens over --context random cached rows (a pool of 1060 blocks, as `bench prefix` sizes it);
"no_attention" the same forward with every attention call returning its queries (projections, norms, RoPE,
SwiGLU, pool writes, lm_head of the last row: work the cold prefill does per token as well); "attention_gemms"
the attention's score and P @ V GEMMs alone for the 30 layers ([3] x [96 x 64] @ [64 x kv_len] and
[3] x [96 x kv_len] @ [kv_len x 64], each layer's K/V distinct, evaluated once per layer as the hit does).

    .venv/bin/python docs/experiments/hit_floor.py --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import zkv_mlx  # noqa: F401  (loads OpenBLAS before MLX)
import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_hit_overheads import _Seq  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    from zkv_mlx.engine.runner import ModelRunner
    from zkv_mlx.models import paged
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
    hkv, hd = pool.n_kv_heads, pool.head_dim
    rows = lm.model.args.num_attention_heads // hkv * L  # query heads per kv head x chunk tokens
    n = ctx + L
    ks = [mx.random.normal((hkv, n, hd)) for _ in range(lm.n_layers)]
    vs = [mx.random.normal((hkv, n, hd)) for _ in range(lm.n_layers)]
    q = mx.random.normal((hkv, rows, hd))
    mx.eval(ks, vs, q)
    attend = paged.attend

    def forward(fn):
        paged.attend = fn
        try:
            t0 = time.perf_counter()
            mx.eval(runner.prefill(seq, ctx, ctx + L))
            return time.perf_counter() - t0
        finally:
            paged.attend = attend

    def gemms():
        t0 = time.perf_counter()
        x = q
        for k, v in zip(ks, vs):
            s = x @ k.swapaxes(-1, -2)
            mx.eval(s)  # the hit syncs here for numpy's exp
            x = (s @ v) * 1e-3
        mx.eval(x)
        return time.perf_counter() - t0

    res = {"hit": [], "no_attention": [], "attention_gemms": []}
    for r in range(args.rounds + 1):  # round 0 warms up
        t = (forward(attend), forward(lambda q, *a, **k: q), gemms())
        if r:
            for name, v in zip(res, t):
                res[name].append(v)
    out = {name: round(1e3 * statistics.median(v), 1) for name, v in res.items()}
    out["floor"] = round(out["no_attention"] + out["attention_gemms"], 1)
    print(json.dumps({"context": ctx, "suffix": L, "rounds": args.rounds, "query_rows_per_kv_head": rows,
                      "load_avg_1min": round(os.getloadavg()[0], 2), **out}))


if __name__ == "__main__":
    main()
