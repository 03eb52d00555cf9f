"""One decode step for B sequences at a short context: zkv's runner vs the bare mlx-lm model, and their pieces.

Not a shipped command (issue #20 item 3). Same weights (float32), the engine's default KV dtype, random K/V rows,
B sequences of --context positions each (distinct blocks). Alternating, medians of --reps:
- step: the whole greedy step (graph + evaluation + argmax), zkv `ModelRunner.decode` vs `model(y, cache)`;
- attn: the 30 layers' decode attention alone (zkv `attend` over the pool, mlx-lm's SDPA over [B, 3, n, 64]);
- kvwrite: the 30 layers' K/V row writes alone;
- rope: the 30 layers' q and k rotations with the offset as zkv passes it (int32 [B]) and as mlx-lm's KVCache
  does (a Python int).

    .venv/bin/python docs/experiments/profile_batch_step.py --batch 8 --context 64 --reps 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import zkv_mlx  # noqa: F401
import mlx.core as mx

from profile_decode_step import _Seq, _timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()

    from mlx_lm.models.cache import make_prompt_cache

    from zkv_mlx.engine.runner import ModelRunner
    from zkv_mlx.models.attention import attend, decode_metadata
    from zkv_mlx.models.loader import load_model

    lm = load_model(None, "float32")
    model = lm.model
    B, n, bs = args.batch, args.context, 16
    H, D, L = lm.n_kv_heads, lm.head_dim, lm.n_layers
    nbs = -(-n // bs)
    runner = ModelRunner(lm, B * nbs + 2, bs, lm.dtype)
    pool = runner.pool
    for i in range(L):
        pool.k[i] = mx.random.normal(pool.k[i].shape).astype(lm.dtype)
        pool.v[i] = mx.random.normal(pool.v[i].shape).astype(lm.dtype)
    mx.eval(pool.k, pool.v)
    seqs = [_Seq(n, list(range(1 + b * nbs, 1 + (b + 1) * nbs))) for b in range(B)]
    cache = make_prompt_cache(model)
    for c in cache:
        c.update_and_fetch(mx.random.normal((B, H, n - 1, D)), mx.random.normal((B, H, n - 1, D)))
    mx.eval([c.state for c in cache])
    n_heads = model.args.num_attention_heads
    scale = D ** -0.5

    def zkv_step():
        mx.eval(mx.argmax(runner.decode(seqs), axis=-1))

    def mlx_step():
        y = mx.argmax(model(mx.ones((B, 1), dtype=mx.int32), cache=cache)[:, -1], axis=-1)
        mx.eval(y)
        for c in cache:
            c.offset -= 1

    q = mx.random.normal((B, n_heads, 1, D))
    mx.eval(q)
    meta = decode_metadata(pool, [n - 1] * B, runner._plan(seqs, [[n - 1]] * B), [s.block_table for s in seqs],
                           [n] * B, False)
    keys = [c.keys[..., :n, :] for c in cache]
    vals = [c.values[..., :n, :] for c in cache]
    mx.eval(keys, vals)

    def zkv_attn():
        mx.eval([attend(q, i, meta, scale) for i in range(L)])

    def mlx_attn():
        mx.eval([mx.fast.scaled_dot_product_attention(q, keys[i], vals[i], scale=scale) for i in range(L)])

    rows = mx.random.normal((B, H, D))
    new = mx.random.normal((B, H, 1, D))
    mx.eval(rows, new)

    def zkv_write():
        for i in range(L):
            pool.write(i, rows, rows, meta.slot_mapping)
        mx.eval(pool.k, pool.v)

    def mlx_write():
        out = []
        for c in cache:
            out.append(c.update_and_fetch(new, new))
            c.offset -= 1
        mx.eval(out)

    rope = model.model.layers[0].self_attn.rope
    kk = mx.random.normal((B, H, 1, D))
    mx.eval(kk)

    def zkv_rope():
        mx.eval([(rope(q, offset=meta.offset), rope(kk, offset=meta.offset)) for _ in range(L)])

    def mlx_rope():
        mx.eval([(rope(q, offset=n - 1), rope(kk, offset=n - 1)) for _ in range(L)])

    for f in (zkv_step, mlx_step):
        f()
    res = {"batch": B, "context": n}
    for name, z, m in (("step", zkv_step, mlx_step), ("attn", zkv_attn, mlx_attn), ("kvwrite", zkv_write, mlx_write),
                       ("rope", zkv_rope, mlx_rope)):
        zt, mt = [], []
        for _ in range(args.reps):
            zt.append(_timed(z, pool))
            mt.append(_timed(m, cache))
        res[f"zkv_{name}_ms"] = round(1e3 * statistics.median(zt), 2)
        res[f"mlx_{name}_ms"] = round(1e3 * statistics.median(mt), 2)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
