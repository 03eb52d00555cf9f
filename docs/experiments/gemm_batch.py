"""Why 8 decode streams are not 8x one here: one decode step's Linear layers for M = 1 vs M = 8 rows (and
M = 32: a prefix hit's 32-token suffix).

Not a shipped command (issue #20 item 3). The bundled model's weight shapes (float32, [out, in] as mlx-lm stores
them), one copy per layer (30 layers, so nothing stays in the 32 MB L3), the head left out. Variants, alternating,
medians of --reps:
- mlx: `x @ W.T` as mlx-lm's Linear runs it (MLX's CPU matmul -> OpenBLAS sgemm);
- mlx_rows: M = 8 as 8 separate M = 1 products (reads the weights 8 times: the floor a batch must beat);
- numpy: `x @ W.T` through numpy's own OpenBLAS (sgemv for M = 1);
- mlx_wt: the weights stored transposed ([in, out] contiguous), `x @ Wt`.
Prints ms per step of all layers' projections and the implied weight read rate (GB/s).

    .venv/bin/python docs/experiments/gemm_batch.py --reps 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import zkv_mlx  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx
import numpy as np

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    ws = [[mx.random.normal(s) for s in SHAPES] for _ in range(args.layers)]
    wts = [[mx.contiguous(w.T) for w in layer] for layer in ws]
    mx.eval(ws, wts)
    nws = [[np.array(w) for w in layer] for layer in ws]
    nbytes = sum(w.nbytes for layer in nws for w in layer)
    res = {"weight_mb": round(nbytes / 1e6, 1)}
    for m in (1, 8, 32):
        xs = {i: mx.random.normal((m, i)) for i in (576, 1536)}
        mx.eval(list(xs.values()))
        nxs = {i: np.array(x) for i, x in xs.items()}
        fns = {
            "mlx": lambda: mx.eval([xs[w.shape[1]] @ w.T for layer in ws for w in layer]),
            "mlx_wt": lambda: mx.eval([xs[w.shape[0]] @ w for layer in wts for w in layer]),
            "numpy": lambda: [nxs[w.shape[1]] @ w.T for layer in nws for w in layer],
        }
        if m == 8:
            fns["mlx_rows"] = lambda: mx.eval([xs[w.shape[1]][r:r + 1] @ w.T for layer in ws for w in layer
                                               for r in range(m)])
        ts = {k: [] for k in fns}
        for _ in range(args.reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                ts[k].append(time.perf_counter() - t0)
        for k, v in ts.items():
            t = statistics.median(v)
            res[f"m{m}_{k}_ms"] = round(t * 1e3, 2)
            res[f"m{m}_{k}_gb_s"] = round(nbytes / t / 1e9, 2)
    for k in ("mlx", "numpy", "mlx_wt"):
        res[f"ceiling8_{k}"] = round(8 * res[f"m1_{k}_ms"] / res[f"m8_{k}_ms"], 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
