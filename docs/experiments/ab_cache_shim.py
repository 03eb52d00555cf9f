"""The decode step's per-layer pieces that w/decode9 changed (or measured), old vs new side by side (issue #20).

Not a shipped command. For the bundled model's geometry (9 query heads, 3 KV heads, head_dim 64, hidden 576,
30 layers, float32) it times one step's worth of each piece (one graph for all layers, evaluated), alternating
old / new, medians of --reps, ms; and checks that old and new give bitwise the same arrays:
- rope: 60 calls (q and k of 30 layers) of `nn.RoPE` with an int32 [1] offset (`mx.fast.rope`'s CPU fallback)
  vs `StepRoPE` (models/step_rope.py: one table per step);
- norm: 61 `nn.RMSNorm` calls on one row (`mx.fast.rms_norm`) vs `DecodeRMSNorm` (models/fused_norm.py);
- write: 30 layers' K and V row writes into a --blocks pool by scatter with index arrays (`KVPool.write`) vs a
  slice update at Python-int (block, offset) (not changed: storage/kv_pool.py is not this branch's file).

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
    from zkv_mlx.models import fused_norm
    from zkv_mlx.models.fused_norm import DecodeRMSNorm
    from zkv_mlx.models.step_rope import StepRoPE

    L, H, HQ, D, BS, HID = 30, 3, 9, 64, 16, 576
    rope = nn.RoPE(D, traditional=True, base=10000)
    step = StepRoPE(rope)
    norm = nn.RMSNorm(HID, eps=1e-5)
    norm.weight = mx.random.normal((HID,))
    fused = DecodeRMSNorm(norm)
    pos = 2047
    q = [mx.random.normal((1, HQ, 1, D)) for _ in range(L)]
    k = [mx.random.normal((1, H, 1, D)) for _ in range(L)]
    x = [mx.random.normal((1, 1, HID)) for _ in range(2 * L + 1)]
    pool = [mx.zeros((args.blocks, H, BS, D)) for _ in range(2 * L)]
    mx.eval(q, k, x, norm.parameters(), pool)
    heads = mx.arange(H)[None, :]
    b, o = pos // BS + 1, pos % BS

    def rope_old():
        off = mx.array([pos], dtype=mx.int32)
        return [y for i in range(L) for y in (rope(q[i], offset=off), rope(k[i], offset=off))]

    def rope_new():
        off = mx.array([pos], dtype=mx.int32)
        return [y for i in range(L) for y in (step(q[i], offset=off), step(k[i], offset=off))]

    def norm_old():
        return [norm(r) for r in x]

    def norm_new():
        with fused_norm.paged_forward():
            return [fused(r) for r in x]

    def write_old():
        bb, oo = mx.array([b], dtype=mx.int32)[:, None], mx.array([o], dtype=mx.int32)[:, None]
        for i in range(2 * L):
            pool[i][bb, heads, oo] = k[i // 2].reshape(1, H, D)
        return pool

    def write_new():
        for i in range(2 * L):
            pool[i][b, :, o] = k[i // 2].reshape(H, D)
        return pool

    def same(fa, fb):
        a, c = fa(), fb()
        mx.eval(a, c)
        return all(bool(mx.array_equal(u, v)) for u, v in zip(a, c))

    res = {"same_bits": {"rope": same(rope_old, rope_new), "norm": same(norm_old, norm_new),
                         "write": same(write_old, write_new)}}
    for name, fa, fb in (("rope", rope_old, rope_new), ("norm", norm_old, norm_new), ("write", write_old, write_new)):
        ta, tb = [], []
        for _ in range(args.reps):
            for f, t in ((fa, ta), (fb, tb)):
                t0 = time.perf_counter()
                mx.eval(f())
                t.append(time.perf_counter() - t0)
        res[name] = {"old_ms": round(1e3 * statistics.median(ta), 3), "new_ms": round(1e3 * statistics.median(tb), 3)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
