"""How the sequences of `bench batch`'s batched round actually run: decode batch sizes per step, attention groups,
chained (pipelined) steps and preemptions, for a given KV pool size.

Not a shipped command (issue #20 item 4, w/batch8). Runs the bench's own round (N threads, 32-token prompts) after
a warm-up round and counts, over the measured round's decode steps, (sequences decoded, attention groups) and
(sequences, chained with the step before). "dynamic" is the engine's default pool (four contexts); give e.g.
256MB for a pool that holds every stream.

    .venv/bin/python docs/experiments/batch_admission.py --kv-cache-memory dynamic
    .venv/bin/python docs/experiments/batch_admission.py --kv-cache-memory 256MB
"""

from __future__ import annotations

import argparse
import collections
import json

import zkv_mlx  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--kv-cache-memory", default="dynamic")
    args = ap.parse_args()

    from zkv_mlx import ZKV
    from zkv_mlx.bench.batch import _round
    from zkv_mlx.bench.common import bench_tokens
    from zkv_mlx.engine import engine as engine_mod
    from zkv_mlx.engine import runner as runner_mod

    groups: collections.Counter = collections.Counter()
    chained: collections.Counter = collections.Counter()
    orig_meta, orig_decode = runner_mod.decode_metadata, engine_mod.Engine._decode

    def decode_metadata(*a, **k):
        meta = orig_meta(*a, **k)
        groups[f"{len(a[1])} seqs, {len(meta.groups or [])} groups"] += 1
        return meta

    def _decode(self, seqs):
        prev = self._inflight
        if seqs:
            chained[f"{len(seqs)} seqs, chained {prev is not None and prev.seqs == seqs}"] += 1
        return orig_decode(self, seqs)

    runner_mod.decode_metadata, engine_mod.Engine._decode = decode_metadata, _decode
    N = args.streams
    model = ZKV(max_context=32 + args.tokens + 16, max_num_seqs=16, kv_cache_memory=args.kv_cache_memory)
    text = bench_tokens(model.tokenizer, 32 * 2 * N)
    prompts = [text[i * 32:(i + 1) * 32] for i in range(2 * N)]
    _round(model, prompts[:N], 8)
    before = model.kv_cache_stats()["preemptions"]
    groups.clear()
    chained.clear()
    rate, e2e = _round(model, prompts[N:], args.tokens)
    st = model.kv_cache_stats()
    model.close()
    print(json.dumps({"kv_cache_memory": args.kv_cache_memory, "kv_blocks": st["blocks_total"],
                      "preemptions_in_round": st["preemptions"] - before, "batched_tok_s": round(rate, 2),
                      "batched_e2e_tok_s": round(e2e, 2), "steps_by_groups": dict(groups),
                      "steps_by_chaining": dict(chained)}), flush=True)


if __name__ == "__main__":
    main()
