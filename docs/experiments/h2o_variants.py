"""h2o block-ranking variants side by side with window on the same windows (the experiment behind the h2o tables in
docs/benchmarks.md). Research script: it swaps the ranking functions of zkv_mlx.engine.evict per policy.

    python docs/experiments/h2o_variants.py CONTEXT BUDGET WINDOWS SPEC [SPEC ...]

WINDOWS: N (the first N windows of the default text) or A-B (windows A to B, 1-based: held-out windows).

SPEC = mode:reduce:decay:recent:rotation
  mode     "distant": average mass per query received while beyond the recent window (the ranking shipped before
           commit c644f8c); "latest": mass per query of each forward, averaged with `decay` per 16-token chunk
           (decay 0 = the latest chunk alone; 0.95 is what h2o ships, as a 216-token half-life).
  reduce   "sum" or "max" of the per-layer mass.
  recent   protected recent tokens. rotation: "all" (StreamingLLM positions, as shipped) or "none" (kept keys
           stay at their original positions, as in the H2O paper).
  tau      optional 6th field: each score times exp(-age / tau), age = the block's distance from the end of the
           cache in tokens (a recency prior; tau -> 0 gives the window policy's choice).
Prints one JSON line: per policy {"ppl_ref", "ppl", "delta_pct", "kl_mean", "tokens"}.
"""

import json
import sys

import zkv_mlx  # noqa: F401  (loads OpenBLAS before mlx.core)

import mlx.core as mx
import numpy as np

import zkv_mlx.engine.evict as E
import zkv_mlx.engine.runner as R
import zkv_mlx.eval.ppl as P
from zkv_mlx.cache.policy import KVPolicy
from zkv_mlx.eval.ppl import default_text, eval_policies, windows
from zkv_mlx.models.loader import load_model

VARIANT: dict = {}  # id(policy) -> (mode, reduce, decay)
AGE: dict = {}  # id(policy) -> tau: scores times exp(-block age in tokens / tau) (a recency prior)
NO_ROTATION: set = set()


def _stack(ctx):  # per sequence: the per-layer masses [n_layers, nb] (reduced per variant below)
    if ctx.mass is None:
        return None
    return [mx.stack(parts) if parts else None for parts in ctx.mass]


def add_mass(seq, mass, n_queries):
    if mass is None:
        return
    mode, red, decay = VARIANT[id(seq.policy)]
    m = np.array((mass.max(axis=0) if red == "max" else mass.sum(axis=0)).astype(mx.float32)).tolist()
    grow = len(m) - len(seq.mass)
    if grow > 0:
        seq.mass.extend([0.0] * grow)
        seq.seen.extend([0] * grow)
    pol = seq.policy
    if mode == "distant":
        lo, hi = pol.sink_blocks, max(pol.sink_blocks, seq.cache_len // pol.block_size - pol.recent_blocks)
        for i in range(lo, min(hi, len(m))):
            seq.mass[i] += m[i]
            seq.seen[i] += n_queries
        return
    for i, x in enumerate(m):
        x /= n_queries
        seq.mass[i] = x if not seq.seen[i] else decay * seq.mass[i] + (1 - decay) * x
        seq.seen[i] = 1


def scores(seq, n_blocks):
    distant = VARIANT[id(seq.policy)][0] == "distant"
    out = []
    for i in range(n_blocks):
        seen = seq.seen[i] if i < len(seq.seen) else 0
        out.append(float("inf") if not seen else seq.mass[i] / seen if distant else seq.mass[i])
    tau = AGE.get(id(seq.policy))
    if tau:
        bs = seq.policy.block_size
        out = [x * np.exp(-(n_blocks - 1 - i) * bs / tau) for i, x in enumerate(out)]
    return out


def main() -> None:
    R._sum_mass, E.add_mass, E.scores = _stack, add_mass, scores
    init = P._PolicyRun.__init__

    def run_init(self, lm, policy, n_blocks):
        init(self, lm, policy, n_blocks)
        if id(policy) in NO_ROTATION:
            self.runner.shift_keys = lambda ids, d: None

    P._PolicyRun.__init__ = run_init
    context, budget = int(sys.argv[1]), int(sys.argv[2])
    first, _, last = sys.argv[3].partition("-")  # "2": the first two windows; "3-4": the third and fourth
    first, last = (1, int(first)) if not last else (int(first), int(last))
    lm = load_model(None, "auto")
    wins = windows(lm.tokenizer.encode(default_text()), context, last)[first - 1:]
    pols = {"window": KVPolicy("window", budget, 16, 4)}
    VARIANT[id(pols["window"])] = ("latest", "sum", 0.0)
    for spec in sys.argv[4:]:
        mode, red, decay, recent, rot, *more = spec.split(":")
        pols[spec] = pol = KVPolicy("h2o", budget, 16, 4, int(recent))
        if more:
            AGE[id(pol)] = float(more[0])
        VARIANT[id(pol)] = (mode, red, float(decay))
        if rot == "none":
            NO_ROTATION.add(id(pol))
    print(json.dumps(eval_policies(lm, wins, pols, 16)), flush=True)


if __name__ == "__main__":
    main()
