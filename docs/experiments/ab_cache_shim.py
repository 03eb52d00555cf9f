"""The decode step's per-layer cache-shim pieces, alternatives side by side (issue #20, w/decode9).

Not a shipped command. For the bundled model's geometry (9 query heads, 3 KV heads, head_dim 64, float32 pool
[num_blocks, 3, 16, 64]) it times, over 30 layers (one graph, evaluated), medians of --reps, alternating:
- rope: `nn.RoPE` on q and k with an int32 [1] array offset (what the engine passes) vs a Python int (mlx-lm);
- write: the pool row write by scatter with index arrays (`KVPool.write`) vs a slice update at Python-int
  (block, offset), after the [B, H, 1, D] -> [B, H, D] reshape (no transpose for one token).
It also checks that each pair gives bitwise the same arrays.

    flock -x /tmp/s9/cpu.lock nice -n -20 .venv/bin/python docs/experiments/ab_cache_shim.py --reps 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import zkv_mlx  # noqa: F401
import mlx.core as mx
import mlx.nn as nn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--blocks", type=int, default=2060, help="pool blocks (the bench's pool at max_context 8224)")
    args = ap.parse_args()
    L, H, HQ, D, BS = 30, 3, 9, 64, 16
    rope = nn.RoPE(D, traditional=True, base=10000)
    pos = 2047
    q = [mx.random.normal((1, HQ, 1, D)) for _ in range(L)]
    k = [mx.random.normal((1, H, 1, D)) for _ in range(L)]
    pool = [mx.zeros((args.blocks, H, BS, D)) for _ in range(L)]
    mx.eval(q, k, pool)
    heads = mx.arange(H)[None, :]
    b, o = pos // BS + 1, pos % BS

    def rope_arr():
        off = mx.array([pos], dtype=mx.int32)
        return [x for i in range(L) for x in (rope(q[i], offset=off), rope(k[i], offset=off))]

    def rope_int():
        return [x for i in range(L) for x in (rope(q[i], offset=pos), rope(k[i], offset=pos))]

    def write_scatter():
        bb, oo = mx.array([b], dtype=mx.int32)[:, None], mx.array([o], dtype=mx.int32)[:, None]
        for i in range(L):
            rows = k[i].transpose(0, 2, 1, 3).reshape(1, H, -1)
            pool[i][bb, heads, oo] = rows.astype(mx.float32)
        return pool

    def write_slice():
        for i in range(L):
            pool[i][b, :, o] = k[i].reshape(H, D)
        return pool

    same = {}
    a, c = rope_arr(), rope_int()
    mx.eval(a, c)
    same["rope"] = all(bool(mx.array_equal(x, y)) for x, y in zip(a, c))
    write_scatter()
    s1 = [p[b, :, o] for p in pool]
    mx.eval(s1)
    for p in pool:
        p[b, :, o] = mx.zeros((H, D))
    write_slice()
    s2 = [p[b, :, o] for p in pool]
    mx.eval(s2)
    same["write"] = all(bool(mx.array_equal(x, y)) for x, y in zip(s1, s2))
    res = {"same_bits": same}
    for name, fa, fb in (("rope", rope_arr, rope_int), ("write", write_scatter, write_slice)):
        ta, tb, ba, bb_ = [], [], [], []
        for _ in range(args.reps):
            for f, t, tbld in ((fa, ta, ba), (fb, tb, bb_)):
                t0 = time.perf_counter()
                out = f()
                t1 = time.perf_counter()
                mx.eval(out)
                t.append(time.perf_counter() - t0)
                tbld.append(t1 - t0)
        res[name] = {"a_ms": round(1e3 * statistics.median(ta), 3), "b_ms": round(1e3 * statistics.median(tb), 3),
                     "a_build_ms": round(1e3 * statistics.median(ba), 3),
                     "b_build_ms": round(1e3 * statistics.median(bb_), 3)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
