"""A/B in one process: a short prefill chunk over a long cached context, old path vs new path.

Not a shipped command (issue #20, the prefix bench's hit). The bundled model's `ModelRunner.prefill` computes
--suffix new tokens at cache indices [--context, --context + --suffix) over a pool whose first --context rows are
random K/V (the attention's cost does not depend on their values, so no cold prefill is needed). "old" sets
`models.attention.CHUNK_MAX_QUERIES = 1` (multi-token chunks gather the context and take
`prefill_cpu.tiled_attention`, as before w/prefixhit), "new" the default (`prefill_cpu.paged_chunk_attention`
over the pool). Alternating old / new, medians of --rounds:

- forward: the chunk's whole forward (30 layers, last-row logits, argmax read back), as the engine runs it;
- attn: the 30 layers' attention alone for fixed queries;
- short: the same chunk's forward at context 0 (projections, MLP, head: what attention adds to);
- max |logits old - logits new| of the forward (numeric agreement; the pool is shared, so it is the same input).

    .venv/bin/python docs/experiments/ab_suffix_chunk.py --context 4096 --suffix 32 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import zkv_mlx  # noqa: F401  (loads OpenBLAS before MLX)
import mlx.core as mx


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
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()

    from zkv_mlx.engine.runner import ModelRunner
    from zkv_mlx.models import attention
    from zkv_mlx.models.attention import attend, prefill_metadata
    from zkv_mlx.models.loader import load_model

    lm = load_model(None, "float32")
    ctx, L, bs = args.context, args.suffix, 16
    nb = -(-(ctx + L) // bs)
    runner = ModelRunner(lm, nb + 4 + -(-L // bs), bs, lm.dtype)
    pool = runner.pool
    for i in range(lm.n_layers):
        pool.k[i] = mx.random.normal(pool.k[i].shape).astype(lm.dtype)
        pool.v[i] = mx.random.normal(pool.v[i].shape).astype(lm.dtype)
    mx.eval(pool.k, pool.v)
    seq = _Seq(ctx + L, list(range(1, nb + 1)))
    n_heads, d = lm.model.args.num_attention_heads, lm.head_dim
    q = mx.random.normal((1, n_heads, L, d))
    mx.eval(q)
    meta = prefill_metadata(pool, ctx, runner._plan([seq], [list(range(ctx, ctx + L))]), seq.block_table, ctx + L,
                            False)
    logits = {}

    def forward(name):
        t0 = time.perf_counter()
        out = runner.prefill(seq, ctx, ctx + L)
        mx.eval(mx.argmax(out), out)
        logits[name] = out
        return time.perf_counter() - t0

    def attn(_):
        meta.plan = None
        t0 = time.perf_counter()
        mx.eval([attend(q, i, meta, d ** -0.5) for i in range(lm.n_layers)])
        return time.perf_counter() - t0

    def short(_):
        s = _Seq(L, list(range(nb + 2, nb + 2 + -(-L // bs))))  # blocks of its own: the context stays
        t0 = time.perf_counter()
        mx.eval(mx.argmax(runner.prefill(s, 0, L)))
        return time.perf_counter() - t0

    paths = {"old": 1, "new": attention.CHUNK_MAX_QUERIES}
    res = {f"{p}_{m}": [] for m in ("forward", "attn", "short") for p in paths}
    diffs = []
    for r in range(args.rounds + 1):  # round 0 warms up
        for p, limit in paths.items():
            attention.CHUNK_MAX_QUERIES = limit
            for m, fn in (("forward", forward), ("attn", attn), ("short", short)):
                t = fn(p)
                if r:
                    res[f"{p}_{m}"].append(t)
        diffs.append(mx.abs(logits["old"] - logits["new"]).max().item())
    out = {"context": ctx, "suffix": L, "rounds": args.rounds}
    out.update({f"{k}_ms": round(1e3 * statistics.median(v), 1) for k, v in res.items()})
    out["forward_ratio"] = round(statistics.median(res["old_forward"]) / statistics.median(res["new_forward"]), 2)
    out["attn_ratio"] = round(statistics.median(res["old_attn"]) / statistics.median(res["new_attn"]), 2)
    out["max_abs_logit_diff"] = max(diffs)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
