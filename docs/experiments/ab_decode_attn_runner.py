"""A/B of the CPU decode attention inside the runner's synchronous decode step (issue #20, w/dattn9).

Runs `ModelRunner.decode` of the bundled model (float32 weights and pool) over random K/V of each context, one
step at a time evaluated (greedy argmax read back), alternating the variants of the long-sequence decode
attention in one process: "old" = main's `single_decode_attention` before this branch
(_old_decode_attention.py), "new" = the current one, "none" = attention replaced by the query itself (no K/V
read, and the K/V writes then never evaluated), "write_only" = the same with the writes evaluated (the bound any
attention change has). Prints JSON per context: the step's ms per variant (medians over --rounds of the min of
--reps steps) and old / new.

    flock -x /tmp/s9/cpu.lock nice -n -20 .venv/bin/python docs/experiments/ab_decode_attn_runner.py --contexts 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import zkv_mlx  # noqa: F401  (loads OpenBLAS before mlx.core, zkv_mlx/_blas.py)
import mlx.core as mx
from _old_decode_attention import old_single_decode_attention


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


def _write_only(q, k_pool, v_pool, *args, **kwargs):
    # no attention, but the step's K/V writes are evaluated (one element of each written pool read)
    return q + (k_pool[:1, :1, :1] * 0 + v_pool[:1, :1, :1] * 0).reshape(1, 1, 1, -1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="2048,4096,8192")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default="old,new,none")
    ap.add_argument("--pool-blocks", type=int, default=0, help="pool size in blocks (default: the longest context's)")
    args = ap.parse_args()

    from zkv_mlx.engine.runner import ModelRunner
    from zkv_mlx.kernels import reference
    from zkv_mlx.models import attention
    from zkv_mlx.models.loader import load_model

    lm = load_model(None, "float32")
    contexts = [int(c) for c in args.contexts.split(",")]
    bs = 16
    runner = ModelRunner(lm, args.pool_blocks or max(contexts) // bs + 3, bs, lm.dtype)
    pool = runner.pool
    for i in range(lm.n_layers):
        pool.k[i] = mx.random.normal(pool.k[i].shape).astype(lm.dtype)
        pool.v[i] = mx.random.normal(pool.v[i].shape).astype(lm.dtype)
    mx.eval(pool.k, pool.v)
    impl = {"old": old_single_decode_attention, "new": reference.single_decode_attention,
            "none": lambda q, *a, **k: q, "write_only": _write_only}
    names = args.variants.split(",")
    for n in contexts:
        seq = _Seq(n, list(range(1, -(-n // bs) + 1)))
        times = {v: [] for v in names}
        for _ in range(args.rounds):
            for v in names:
                attention.single_decode_attention = impl[v]
                ts = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    mx.eval(mx.argmax(runner.decode([seq]), axis=-1))
                    ts.append(time.perf_counter() - t0)
                times[v].append(min(ts) * 1e3)
        attention.single_decode_attention = reference.single_decode_attention
        med = {v: round(statistics.median(t), 2) for v, t in times.items()}
        res = {"context": n, "step_ms": med, "per_round": {v: [round(x, 1) for x in t] for v, t in times.items()}}
        if "old" in med and "new" in med:
            res["old_over_new"] = round(med["old"] / med["new"], 3)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
