"""`zkv-mlx eval ppl`: perplexity and mean KL divergence of a quantized KV cache (or of a long-context policy,
`--kv-policy window|h2o --budget N`, on a float or with `--kv-quant` a quantized cache) against the
full-precision full cache.

Both caches run through the real paged path (ModelRunner.prefill in chunks, so attention reads the stored,
quantized pages), side by side on the same windows of `--context` tokens. The last output line is JSON:
{"format", "ppl_ref", "ppl", "delta_pct", "kl_mean", "tokens", ...}; `--vs-mlx-lm` adds the same figures for
mlx-lm's `QuantizedKVCache` (its own model forward) at the same bits and group size under "mlx_lm".
"""

from __future__ import annotations

import json
import math
import sys
import time

import mlx.core as mx

from ..config import KVCacheConfig
from ..kernels.kv_quant import DEFAULT_GROUP
from ..errors import ConfigError


def default_text() -> str:
    """English text present on every machine offline: the standard library's pydoc topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class _Score:
    """Accumulates next-token NLL of a reference and a candidate, and KL(reference || candidate)."""

    def __init__(self):
        self.nll_ref = self.nll = self.kl = 0.0
        self.n = 0

    def add(self, logits_ref: mx.array, logits: mx.array, targets: mx.array) -> None:
        # logits: [n, vocab] for positions whose next tokens are `targets` [n]
        lr = logits_ref.astype(mx.float32)
        lq = logits.astype(mx.float32)
        lr = lr - mx.logsumexp(lr, axis=-1, keepdims=True)
        lq = lq - mx.logsumexp(lq, axis=-1, keepdims=True)
        t = targets[:, None]
        nr = -mx.take_along_axis(lr, t, axis=-1).sum()
        nq = -mx.take_along_axis(lq, t, axis=-1).sum()
        kl = (mx.exp(lr) * (lr - lq)).sum()
        mx.eval(nr, nq, kl)
        self.nll_ref += nr.item()
        self.nll += nq.item()
        self.kl += kl.item()
        self.n += targets.shape[0]

    def result(self) -> dict:
        ppl_ref, ppl = math.exp(self.nll_ref / self.n), math.exp(self.nll / self.n)
        return {"ppl_ref": round(ppl_ref, 4), "ppl": round(ppl, 4),
                "delta_pct": round(100 * (ppl / ppl_ref - 1), 3), "kl_mean": round(self.kl / self.n, 5),
                "tokens": self.n}


def windows(ids: list[int], context: int, n: int) -> list[list[int]]:
    """The first n non-overlapping windows of `context` tokens (fewer if the text is short)."""
    out = [ids[i:i + context] for i in range(0, len(ids) - context + 1, context)]
    return out[:n]


def eval_zkv(lm, wins: list[list[int]], kv: KVCacheConfig, chunk: int) -> tuple[dict, str]:
    """Perplexity/KL of the `kv` format vs float storage (the model's dtype) through ModelRunner."""
    from ..engine.runner import ModelRunner
    from ..engine.sequence import SamplingParams, Sequence

    context = max(len(w) for w in wins)
    bs = kv.block_size
    nb = -(-context // bs) + 1
    ref = ModelRunner(lm, nb, bs, lm.dtype)
    cand = ModelRunner(lm, nb, bs, lm.dtype, kv=kv)
    score = _Score()
    for w in wins:
        seqs = []
        for _ in range(2):
            s = Sequence(prompt_ids=list(w), params=SamplingParams(max_tokens=1))
            s.block_table = list(range(nb))
            seqs.append(s)
        targets = mx.array(w[1:], dtype=mx.int32)
        for start in range(0, len(w), chunk):
            end = min(len(w), start + chunk)
            a = ref.prefill(seqs[0], start, end, all_logits=True)
            b = cand.prefill(seqs[1], start, end, all_logits=True)
            n = min(end, len(w) - 1) - start  # the last position of the window has no target
            score.add(a[:n], b[:n], targets[start:start + n])
    return score.result(), cand.pool.format_name


class _PolicyRun:
    """One sequence under a long-context policy in its own small pool (blocks from a free list); `kv` quantizes
    it (None: float storage)."""

    def __init__(self, lm, policy, n_blocks: int, kv: KVCacheConfig | None = None):
        from ..engine.runner import ModelRunner

        self.policy = policy
        self.runner = ModelRunner(lm, n_blocks, policy.block_size, lm.dtype, kv=kv)
        self.n_blocks = n_blocks
        self.seq = None

    def start(self, ids: list[int]) -> None:
        from ..engine.sequence import SamplingParams, Sequence

        self.seq = Sequence(prompt_ids=list(ids), params=SamplingParams(max_tokens=1))
        self.seq.policy = self.policy
        self.free = list(range(self.n_blocks))
        self.held_positions: list[int] = []  # token positions the cache holds, in cache order

    def chunk(self, start: int, end: int) -> mx.array:
        from ..engine import drop

        seq, bs = self.seq, self.policy.block_size
        seq.num_computed = start
        old = list(seq.block_table)
        gone = set(drop.enforce(seq, end - start, self.runner, self.free.append, lambda b: b))
        self.held_positions = [p for i, b in enumerate(old) if b not in gone
                               for p in self.held_positions[i * bs:(i + 1) * bs]] + list(range(start, end))
        while len(seq.block_table) * bs < end - seq.dropped:
            seq.block_table.append(self.free.pop(0))
        logits = self.runner.prefill(seq, start, end, all_logits=True)
        mass = self.runner.mass
        mx.eval(logits)
        seq.num_computed = end
        drop.add_mass(seq, mass and mass[0], end - start)
        return logits


def eval_policies(lm, wins: list[list[int]], policies: dict, chunk: int, kvs: dict | None = None) -> dict:
    """Perplexity/KL of each long-context policy against the full float cache, chunk by chunk on the same windows.

    Args:
        policies: name -> KVPolicy. chunk: tokens per forward (queries in a chunk see the cache as it was
            before the chunk plus the chunk itself). kvs: name -> KVCacheConfig of a quantized policy run.
    """
    from ..engine.runner import ModelRunner
    from ..engine.sequence import SamplingParams, Sequence

    bs = next(iter(policies.values())).block_size
    context = max(len(w) for w in wins)
    nb = -(-context // bs) + 1
    ref = ModelRunner(lm, nb, bs, lm.dtype)
    kvs = kvs or {}
    runs = {name: _PolicyRun(lm, p, -(-(p.budget + chunk) // bs) + 2, kvs.get(name)) for name, p in policies.items()}
    scores = {name: _Score() for name in policies}
    for wi, w in enumerate(wins):
        print(f"window {wi + 1}/{len(wins)} ({len(w)} tokens, {len(policies)} policies + the full cache)...",
              file=sys.stderr, flush=True)
        s_ref = Sequence(prompt_ids=list(w), params=SamplingParams(max_tokens=1))
        s_ref.block_table = list(range(nb))
        for r in runs.values():
            r.start(w)
        targets = mx.array(w[1:], dtype=mx.int32)
        for start in range(0, len(w), chunk):
            end = min(len(w), start + chunk)
            a = ref.prefill(s_ref, start, end, all_logits=True)
            mx.eval(a)
            n = min(end, len(w) - 1) - start
            for name, r in runs.items():
                b = r.chunk(start, end)
                scores[name].add(a[:n], b[:n], targets[start:start + n])
    return {name: sc.result() for name, sc in scores.items()}


def run_policy(args, lm, wins, t0, kv: KVCacheConfig) -> int:
    """A policy on a float cache, or with --kv-quant on a quantized one beside the same policy on a float cache
    (same block size, same windows): "float_policy" and "vs_float_policy_points" (delta_pct minus its)."""
    from ..cache.policy import KVPolicy
    from ..config import PolicyConfig

    quant = kv.quant != "none"
    bs = kv.block_size if quant else args.block_size or 16
    if args.kv_policy == "full" or args.budget is None:
        # an example that fits every policy evaluated (--compare adds h2o) at this block size
        need = KVPolicy("h2o", 0, bs, args.sinks, args.h2o_recent).min_budget
        raise ConfigError(f"--kv-policy window|h2o needs --budget TOKENS (e.g. --budget {max(512, need)})")

    def make(kind: str, sinks: int) -> KVPolicy:
        return KVPolicy.from_config(PolicyConfig(kind=kind, budget=args.budget, sinks=sinks,
                                                 recent=args.h2o_recent), bs)

    policies = {args.kv_policy: make(args.kv_policy, args.sinks)}
    if args.compare:
        policies = {"truncation": make("window", 0), "window": make("window", args.sinks),
                    "h2o": make("h2o", args.sinks)}
    kvs = {}
    if quant:
        name = f"{args.kv_policy}+{kv.quant}"
        policies = {**policies, name: policies[args.kv_policy]}
        kvs[name] = kv
    chunk = min([args.chunk] + [p.chunk for p in policies.values()])
    res = eval_policies(lm, wins, policies, chunk, kvs)
    main = res[name] if quant else res[args.kv_policy]
    out = {"format": args.kv_policy, "policy": args.kv_policy, "budget": args.budget, "sinks": args.sinks, **main}
    if quant:
        flt = res[args.kv_policy]
        out.update({"format": name, "kv_quant": kv.quant, "block_size": bs, "float_policy": flt,
                    "vs_float_policy_points": round(main["delta_pct"] - flt["delta_pct"], 3)})
    if args.compare:
        out["compare"] = res
    _log(args, f"policies: {res}")
    out.update({"context": args.context, "windows": len(wins), "chunk": chunk,
                "seconds": round(time.perf_counter() - t0, 1)})
    print(json.dumps(out))
    return 0


def eval_mlx_lm(model, wins: list[list[int]], bits: int, group_size: int, chunk: int) -> dict:
    """The same figures for mlx-lm's QuantizedKVCache vs its KVCache, with mlx-lm's own forward."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    n_layers = len(model.layers)
    score = _Score()
    for w in wins:
        c_ref = [KVCache() for _ in range(n_layers)]
        c_q = [QuantizedKVCache(group_size=group_size, bits=bits) for _ in range(n_layers)]
        targets = mx.array(w[1:], dtype=mx.int32)
        for start in range(0, len(w), chunk):
            end = min(len(w), start + chunk)
            toks = mx.array(w[start:end], dtype=mx.int32)[None]
            a, b = model(toks, cache=c_ref)[0], model(toks, cache=c_q)[0]
            n = min(end, len(w) - 1) - start
            score.add(a[:n], b[:n], targets[start:start + n])
    return score.result()


def run(args) -> int:
    from ..models.loader import load_model

    t0 = time.perf_counter()
    policy = getattr(args, "kv_policy", None)
    if args.kv_quant is None:
        args.kv_quant = "none" if policy else "int4"
    kv = KVCacheConfig(quant=args.kv_quant, group_size=args.kv_group_size, block_size=args.block_size or "auto",
                       key_layout=args.kv_key_layout, sinks=args.kv_sinks)
    text = open(args.text, encoding="utf-8").read() if args.text else default_text()
    lm = load_model(args.model, args.weights_dtype or "auto")
    wins = windows(lm.tokenizer.encode(text), args.context, args.windows)
    if not wins:
        raise SystemExit(f"the text has fewer than --context {args.context} tokens")
    if policy is not None and policy != "full":
        return run_policy(args, lm, wins, t0, kv)
    res, fmt = eval_zkv(lm, wins, kv, args.chunk)
    out = {"format": args.kv_quant, "kv_format": fmt, **res}
    _log(args, f"zkv {fmt}: {res}")
    if args.vs_mlx_lm:
        spec_bits = {"int8": 8, "int4": 4}.get(args.kv_quant)
        if spec_bits is None:
            out["mlx_lm"] = None  # mlx-lm's cache has one bit width for K and V
        else:
            ref_model = load_model(args.model, args.weights_dtype or "auto").model
            group = kv.group_size or DEFAULT_GROUP[args.kv_quant]
            out["mlx_lm"] = eval_mlx_lm(ref_model, wins, spec_bits, group, args.chunk)
            out["mlx_lm"]["group_size"] = group
            d = out["mlx_lm"]["delta_pct"]
            out["delta_fraction_of_mlx_lm"] = round(out["delta_pct"] / d, 4) if d else None
            _log(args, f"mlx-lm QuantizedKVCache: {out['mlx_lm']}")
    out.update({"context": args.context, "windows": len(wins), "chunk": args.chunk,
                "seconds": round(time.perf_counter() - t0, 1)})
    print(json.dumps(out))
    return 0


def _log(args, msg: str) -> None:
    if not args.json:
        print(msg, file=sys.stderr)
