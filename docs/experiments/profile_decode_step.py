"""Where one decode step's time goes: zkv's runner vs mlx-lm's model call, same weights, same context.

Not a shipped command (issue #20 item 1's profile). Both engines run in this process on the bundled model
(float32 weights, the engine's default KV dtype); the KV rows are random (decode cost does not depend on their
values), so no prefill is needed. Per context it times, alternating zkv / mlx-lm, medians of --reps:

- step: one whole decode step (graph building + evaluation + greedy argmax read back), as the engines run it;
- build: building the step's graph only (Python), no evaluation;
- attn: the 30 layers' decode attention alone (zkv: `attend` over the pool; mlx-lm: its SDPA over its cache);
- kvwrite: the 30 layers' K/V row writes alone (zkv: `KVPool.write`; mlx-lm: `KVCache.update_and_fetch`);
- rest: the model step with attention made trivial (context 16): projections, rope, MLP, norms, head.

    .venv/bin/python docs/experiments/profile_decode_step.py --contexts 2048,4096,8192 --reps 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import zkv_mlx  # noqa: F401  (loads OpenBLAS before MLX)
import mlx.core as mx


def _timed(fn, state) -> float:
    """Seconds of one call; whatever it left lazy (a built graph, pool writes) is evaluated untimed after."""
    t0 = time.perf_counter()
    out = fn()
    t = time.perf_counter() - t0
    mx.eval(out if out is not None else [], _arrays(state))
    return t


def _arrays(state):
    if hasattr(state, "k"):  # the pool
        return [state.k, state.v]
    return [c.state for c in state]


class _Seq:
    """The fields `ModelRunner.decode` reads from a Sequence."""

    def __init__(self, n: int, block_table: list[int]):
        self.all_ids = [1] * n
        self.num_tokens = n
        self.dropped = 0
        self.block_table = block_table
        self.state = []
        self.is_finished = False
        self.policy = None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="2048,4096,8192")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--kv-dtype", default=None, help="pool dtype (default: the engine's, the model's dtype)")
    args = ap.parse_args()

    from mlx_lm.models.cache import make_prompt_cache

    from zkv_mlx.engine.runner import ModelRunner
    from zkv_mlx.models.attention import attend, decode_metadata
    from zkv_mlx.models.loader import load_model

    lm = load_model(None, "float32")
    model = lm.model
    kv_dtype = getattr(mx, args.kv_dtype) if args.kv_dtype else lm.dtype
    contexts = [int(c) for c in args.contexts.split(",")]
    bs = 16
    nblocks = max(contexts) // bs + 2
    runner = ModelRunner(lm, nblocks + 1, bs, kv_dtype)
    pool = runner.pool
    H, D, L = lm.n_kv_heads, lm.head_dim, lm.n_layers
    for i in range(L):
        pool.k[i] = mx.random.normal(pool.k[i].shape).astype(kv_dtype)
        pool.v[i] = mx.random.normal(pool.v[i].shape).astype(kv_dtype)
    mx.eval(pool.k, pool.v)
    scale = D ** -0.5
    n_heads = model.args.num_attention_heads
    print(json.dumps({"kv_dtype": str(kv_dtype), "layers": L, "n_heads": n_heads, "n_kv_heads": H, "head_dim": D}))

    def zkv_step(n):
        seq = _Seq(n, list(range(1, -(-n // bs) + 1)))
        logits = runner.decode([seq])
        return mx.argmax(logits, axis=-1)

    def mlx_cache(n):
        cache = make_prompt_cache(model)
        for c in cache:
            c.update_and_fetch(mx.random.normal((1, H, n - 1, D)), mx.random.normal((1, H, n - 1, D)))
        mx.eval([c.state for c in cache])
        return cache

    for n in [16] + contexts:
        cache = mlx_cache(n)

        def mlx_step():
            # generate_step's per-token work: model call, logprobs, greedy sample, read back
            logits = model(mx.array([[1]]), cache=cache)[:, -1, :]
            logprobs = logits - mx.logsumexp(logits, keepdims=True)
            tok = mx.argmax(logprobs, axis=-1)
            mx.eval(tok, logprobs)
            for c in cache:  # keep the context at n
                c.offset -= 1
            return tok

        def zkv_full():
            mx.eval(zkv_step(n))

        def zkv_build():
            return zkv_step(n)

        def mlx_build():
            out = model(mx.array([[1]]), cache=cache)
            for c in cache:
                c.offset -= 1
            return out

        q = mx.random.normal((1, n_heads, 1, D))
        mx.eval(q)
        seq = _Seq(n, list(range(1, -(-n // bs) + 1)))
        meta = decode_metadata(pool, [n - 1], runner._plan([seq], [[n - 1]]), [seq.block_table], [n], False)
        keys = [c.keys[..., :n, :] for c in cache]
        vals = [c.values[..., :n, :] for c in cache]
        mx.eval(keys, vals)

        def zkv_attn():
            mx.eval([attend(q, i, meta, scale) for i in range(L)])

        def mlx_attn():
            mx.eval([mx.fast.scaled_dot_product_attention(q, keys[i], vals[i], scale=scale) for i in range(L)])

        rows = mx.random.normal((1, H, D))
        mx.eval(rows)

        def zkv_write():
            for i in range(L):
                pool.write(i, rows, rows, meta.slot_mapping)
            mx.eval(pool.k, pool.v)

        new = mx.random.normal((1, H, 1, D))
        mx.eval(new)

        def mlx_write():
            out = []
            for c in cache:
                out.append(c.update_and_fetch(new, new))
                c.offset -= 1
            mx.eval(out)

        for f in (zkv_full, mlx_step):  # warm
            f()
        res = {"context": n}
        for name, z, m in (("step", zkv_full, mlx_step), ("build", zkv_build, mlx_build),
                           ("attn", zkv_attn, mlx_attn), ("kvwrite", zkv_write, mlx_write)):
            zt, mt = [], []
            for _ in range(args.reps):
                zt.append(_timed(z, pool))
                mt.append(_timed(m, cache))
            res[f"zkv_{name}_ms"] = round(1e3 * statistics.median(zt), 2)
            res[f"mlx_{name}_ms"] = round(1e3 * statistics.median(mt), 2)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
