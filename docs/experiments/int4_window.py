"""Issue #19 Must-show 3: int4 under the window policy, its parts separated in one pass over the same windows.

Against the same full float cache (the reference of `zkv-mlx eval ppl`), chunk by chunk on the same windows:
- "int4 full": the int4 cache with no policy (int4's own error at this length; = `eval ppl --kv-quant int4`);
- "window": the window policy on a float cache;
- "window+int4": the window policy on an int4 cache as the engine runs it (storage/key_shift.py: the sink block
  is re-quantized from its rotated float master at each move);
- "window+int4, no master" (unless --no-old): the same without the master, so the sink block is re-quantized from
  its own last re-quantization at each move (the code before w/qsearch).
The first three reproduce `zkv-mlx eval ppl --kv-quant int4 [--kv-policy window --budget N] --context C --json`.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python docs/experiments/int4_window.py --budget 512 --context 4096 --windows 1
"""

from __future__ import annotations

import argparse
import json
import time

import zkv_mlx  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx


class _NoMaster(dict):
    """A `KVPool._key_master` that keeps nothing: every move re-quantizes the block's last re-quantization."""

    def setdefault(self, key, default=None):
        return default


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--text", default=None, help="UTF-8 text file (default: eval ppl's pydoc topics)")
    ap.add_argument("--no-old", action="store_true", help="skip the run without the master")
    ap.add_argument("--kv-group-size", type=int, default=None, help="int4 value groups (default: the format's)")
    ap.add_argument("--kv-sinks", type=int, default=4, help="full-precision sink keys of the int4 cache")
    args = ap.parse_args()

    from zkv_mlx.cache.policy import KVPolicy
    from zkv_mlx.config import KVCacheConfig, PolicyConfig
    from zkv_mlx.engine.runner import ModelRunner
    from zkv_mlx.engine.sequence import SamplingParams, Sequence
    from zkv_mlx.eval.ppl import _PolicyRun, _Score, default_text, windows
    from zkv_mlx.models.loader import load_model

    t0 = time.perf_counter()
    kv = KVCacheConfig(quant="int4", block_size="auto", group_size=args.kv_group_size, sinks=args.kv_sinks)
    lm = load_model(None)
    text = open(args.text, encoding="utf-8").read() if args.text else default_text()
    wins = windows(lm.tokenizer.encode(text), args.context, args.windows)
    bs = kv.block_size  # "auto" resolves per format (32 for int4), as in `eval ppl`
    pol = KVPolicy.from_config(PolicyConfig(kind="window", budget=args.budget, sinks=args.sinks), bs)
    chunk = min(args.chunk, pol.chunk)
    nb = -(-args.context // bs) + 1
    ref = ModelRunner(lm, nb, bs, lm.dtype)
    full_int4 = ModelRunner(lm, nb, bs, lm.dtype, kv=kv)
    n_pol = -(-(pol.budget + chunk) // bs) + 2
    runs = {"window": _PolicyRun(lm, pol, n_pol), "window+int4": _PolicyRun(lm, pol, n_pol, kv)}
    if not args.no_old:
        runs["window+int4, no master"] = _PolicyRun(lm, pol, n_pol, kv)
        runs["window+int4, no master"].runner.pool._key_master = _NoMaster()
    scores = {name: _Score() for name in ["int4 full", *runs]}
    for w in wins:
        seqs = []
        for _ in range(2):
            s = Sequence(prompt_ids=list(w), params=SamplingParams(max_tokens=1))
            s.block_table = list(range(nb))
            seqs.append(s)
        for r in runs.values():
            r.start(w)
        targets = mx.array(w[1:], dtype=mx.int32)
        for start in range(0, len(w), chunk):
            end = min(len(w), start + chunk)
            a = ref.prefill(seqs[0], start, end, all_logits=True)
            mx.eval(a)
            n = min(end, len(w) - 1) - start  # the last position of the window has no target
            t = targets[start:start + n]
            scores["int4 full"].add(a[:n], full_int4.prefill(seqs[1], start, end, all_logits=True)[:n], t)
            for name, r in runs.items():
                scores[name].add(a[:n], r.chunk(start, end)[:n], t)
    res = {name: sc.result() for name, sc in scores.items()}
    flt = res["window"]["delta_pct"]
    out = {"budget": args.budget, "sinks": args.sinks, "block_size": bs, "kv_group_size": args.kv_group_size,
           "kv_sinks": args.kv_sinks, "context": args.context,
           "windows": len(wins), "chunk": chunk, "results": res,
           "vs_float_window_points": {k: round(v["delta_pct"] - flt, 3) for k, v in res.items() if "+int4" in k},
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
