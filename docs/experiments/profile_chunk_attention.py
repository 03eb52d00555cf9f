"""Where a short prefill chunk's time goes inside the model's forward: attention vs the rest, old vs new path.

Not a shipped command (issue #20, the prefix bench's hit). Same setup as `ab_suffix_chunk.py` (the bundled model,
--suffix new tokens over --context random cached rows). Every layer's attention call is timed in place with a
sync before it (its inputs: the layer's projections and K/V writes, "pre") and after it ("attn"), alternating the
old path (`CHUNK_MAX_QUERIES = 1`) and the new one; then the new path's pieces, each synced: its inputs ("pre"),
the K/V copies from the pool ("kv_copy"), the score GEMM ("scores"), numpy's masked exp ("numpy_exp"), the
P @ V GEMM ("pv"). Medians of --rounds, summed over the 30 layers, ms. The syncs add a little to every piece.

    .venv/bin/python docs/experiments/profile_chunk_attention.py --context 4096 --suffix 32 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import zkv_mlx  # noqa: F401  (loads OpenBLAS before MLX)
import mlx.core as mx
import numpy as np


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    from zkv_mlx.engine.runner import ModelRunner
    from zkv_mlx.kernels import prefill_cpu
    from zkv_mlx.models import attention, paged
    from zkv_mlx.models.loader import load_model

    lm = load_model(None, "float32")
    ctx, L, bs = args.context, args.suffix, 16
    nb = -(-(ctx + L) // bs)
    runner = ModelRunner(lm, nb + 2, bs, lm.dtype)
    pool = runner.pool
    for i in range(lm.n_layers):
        pool.k[i] = mx.random.normal(pool.k[i].shape).astype(lm.dtype)
        pool.v[i] = mx.random.normal(pool.v[i].shape).astype(lm.dtype)
    mx.eval(pool.k, pool.v)
    seq = _Seq(ctx + L, list(range(1, nb + 1)))
    acc: dict[str, float] = {}

    def add(key, t):
        acc[key] = acc.get(key, 0.0) + t

    attend = attention.attend

    def timed_attend(q, layer, meta, scale, **kw):
        t0 = time.perf_counter()
        mx.eval(q, pool.k[layer], pool.v[layer])
        t1 = time.perf_counter()
        out = attend(q, layer, meta, scale, **kw)
        mx.eval(out)
        add("pre", t1 - t0)
        add("attn", time.perf_counter() - t1)
        return out

    def pieces(q, k_pool, v_pool, runs, block_ids, length, scale):  # paged_chunk_attention, synced piece by piece
        _, hq, n_q, d = q.shape
        hkv = k_pool.shape[1]
        tp = time.perf_counter()
        mx.eval(q, k_pool, v_pool)  # the layer's projections and K/V writes
        t0 = time.perf_counter()
        k = prefill_cpu._heads(k_pool, runs, block_ids, length)
        v = prefill_cpu._heads(v_pool, runs, block_ids, length)
        qs = (q[0].astype(mx.float32) * scale).reshape(hkv, -1, d)
        mx.eval(k, v, qs)
        t1 = time.perf_counter()
        s = qs @ k.swapaxes(-1, -2)
        mx.eval(s)
        t2 = time.perf_counter()
        sn = np.asarray(s)
        inv = np.stack([prefill_cpu._causal_exp_rows(sn[h], n_q) for h in range(hkv)])
        t3 = time.perf_counter()
        out = (s @ v) * mx.array(inv)
        mx.eval(out)
        for key, t in (("pre", t0 - tp), ("kv_copy", t1 - t0), ("scores", t2 - t1), ("numpy_exp", t3 - t2),
                       ("pv", time.perf_counter() - t3)):
            add(key, t)
        return out.reshape(1, hq, n_q, d).astype(q.dtype)

    def forward():
        acc.clear()
        t0 = time.perf_counter()
        mx.eval(runner.prefill(seq, ctx, ctx + L))
        return {"forward": time.perf_counter() - t0, **acc}

    limit = attention.CHUNK_MAX_QUERIES
    chunk = attention.paged_chunk_attention
    res: dict[str, list] = {"old": [], "new": [], "new_pieces": []}
    paged.attend = timed_attend
    try:
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, lim in (("old", 1), ("new", limit)):
                attention.CHUNK_MAX_QUERIES = lim
                t = forward()
                if r:
                    res[name].append(t)
        paged.attend = attend
        attention.paged_chunk_attention = pieces
        for r in range(args.rounds + 1):
            t = forward()
            if r:
                res["new_pieces"].append(t)
    finally:
        paged.attend = attend
        attention.paged_chunk_attention = chunk
        attention.CHUNK_MAX_QUERIES = limit
    out = {"context": ctx, "suffix": L, "rounds": args.rounds}
    for name, rows in res.items():
        out[name] = {k: round(1e3 * statistics.median(row[k] for row in rows), 1) for k in rows[0]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
