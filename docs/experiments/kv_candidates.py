"""Issue #19: every candidate 4-bit KV format on every text, by fake quantization (quantize then dequantize).

Each candidate is an mlx-lm cache (`FakeQuantCache`) that stores full-precision K/V and hands the model the
dequantized version, with the engine's semantics: keys per channel over the tokens of each *full* block, the
partial tail block and the first `sinks` positions in full precision (storage/channel_keys.py); values per token
in groups along head_dim. Chunked prefill (128 tokens) with write-then-attend, as `zkv-mlx eval ppl`.

CHOOSING texts pick the default (lowest mean delta among candidates within 0.30x fp16 bytes); HELD-OUT texts
are only reported. The chosen format is then measured for real with `zkv-mlx eval ppl --kv-quant int4`.

    .venv/bin/python docs/experiments/kv_candidates.py [--windows 3] [--only NAME,...] > table.md
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import zkv_mlx  # noqa: F401  (loads OpenBLAS before mlx.core: ~10x faster CPU matmuls)
import mlx.core as mx

TEXTS = Path(__file__).parent / "texts"
CHOOSING = ["python-license.txt", "pydoc-topics.txt"]
HELD_OUT = ["gpl-3.txt", "apache-2.0.txt", "idle-help.txt", "code-argparse.py.txt", "german-less-manpage.txt"]
HEAD_DIM = 64  # the bundled model's; bits per element below are per K or V element


def _round_meta(x: mx.array, meta: str) -> mx.array:
    # the stored value of a scale: float16, or an 8-bit float (e4m3: 3 mantissa bits) rounded up so that the
    # range is still covered
    if meta == "f16":
        return x.astype(mx.float16).astype(mx.float32)
    e = mx.floor(mx.log2(mx.maximum(x, 2.0 ** -9)))
    step = 2.0 ** (mx.maximum(e, -6) - 3)
    return mx.ceil(x / step) * step


def affine(x: mx.array, axis: int, bits: int, meta: str) -> mx.array:
    """Fake-quantizes x affinely over `axis` (kept): f16 = float16 scale and bias (kernels/kv_quant.py);
    u8 = e4m3 scale and an integer zero point (8 + 8 bits)."""
    levels = (1 << bits) - 1
    lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    s = _round_meta(mx.maximum((hi - lo) / levels, 1e-6), meta)
    if meta == "f16":
        b = lo.astype(mx.float16).astype(mx.float32)
        return mx.clip(mx.round((x - b) / s), 0, levels) * s + b
    z = mx.clip(mx.round(-lo / s), -128, 127)  # zero point: x = s * (q - z)
    return (mx.clip(mx.round(x / s) + z, 0, levels) - z) * s


def tokens(x: mx.array, bits: int, group: int, meta: str) -> mx.array:
    """Per token, in groups of `group` along the last axis; meta 'mxfp4'/'nvfp4' use mx.quantize's modes."""
    if meta in ("mxfp4", "nvfp4"):
        g = 32 if meta == "mxfp4" else 16
        return mx.dequantize(*mx.quantize(x, group_size=g, bits=4, mode=meta), group_size=g, bits=4, mode=meta)
    g = x.reshape(*x.shape[:-1], -1, group)
    return affine(g, -1, bits, meta).reshape(x.shape)


def hadamard(d: int) -> mx.array:
    h = mx.array([[1.0]])
    while h.shape[0] < d:
        h = mx.concatenate([mx.concatenate([h, h], 1), mx.concatenate([h, -h], 1)], 0)
    return h / math.sqrt(d)


@dataclass(frozen=True)
class Candidate:
    name: str
    block: int  # per-channel key block (tokens)
    k_meta: str  # "f16" | "u8"
    v_group: int
    v_meta: str  # "f16" | "u8" | "mxfp4" | "nvfp4"
    sinks: int = 4
    rotate: bool = False  # Hadamard-rotate keys before the per-channel quantization

    def bits(self) -> float:
        """K + V bits per element, every scale and bias included (tail and sinks are per sequence)."""
        meta = {"f16": 32, "u8": 16}
        k = 4 + meta[self.k_meta] / self.block
        v = 4 + {"mxfp4": 8 / 32, "nvfp4": 8 / 16}.get(self.v_meta, meta.get(self.v_meta, 0) / self.v_group)
        return k + v


CANDIDATES = [
    Candidate("c32 f16 / v g64 f16 (old default)", 32, "f16", 64, "f16"),
    Candidate("c32 f16 / v g32 f16", 32, "f16", 32, "f16"),
    Candidate("c64 f16 / v g32 f16", 64, "f16", 32, "f16"),
    Candidate("c64 f16 / v g32 f16, 0 sinks", 64, "f16", 32, "f16", sinks=0),
    Candidate("c32 f16 / v g32 u8", 32, "f16", 32, "u8"),
    Candidate("c32 u8 / v g32 f16", 32, "u8", 32, "f16"),
    Candidate("c32 f16 / v mxfp4", 32, "f16", 32, "mxfp4"),
    Candidate("c32 f16 / v nvfp4", 32, "f16", 16, "nvfp4"),
    Candidate("c32 f16 rotated / v g64 f16", 32, "f16", 64, "f16", rotate=True),
]


def make_cache_class():
    import mlx_lm.models.llama as llama
    from mlx_lm.models.cache import KVCache

    from zkv_mlx.kernels import prefill_attention_reference

    def sdpa(q, k, v, cache=None, scale=1.0, mask=None, sinks=None):
        # the engine's CPU prefill attention (GEMMs + polynomial exp): MLX's CPU sdpa is ~4x slower here
        return prefill_attention_reference(q, k, v, scale)

    llama.scaled_dot_product_attention = sdpa

    class FakeQuantCache(KVCache):
        """mlx-lm KVCache that returns the candidate's dequantized K/V (full precision kept underneath)."""

        def __init__(self, c: Candidate):
            super().__init__()
            self.c = c

        def update_and_fetch(self, keys, values):
            k, v = super().update_and_fetch(keys, values)  # [B, H, T, D] raw
            return self._keys(k), tokens(v, 4, self.c.v_group, self.c.v_meta)

        def _keys(self, k):
            c, T = self.c, k.shape[2]
            nfull = T // c.block
            if nfull == 0:
                return k
            full = k[:, :, : nfull * c.block]
            if c.sinks:
                # sink rows take the next row's value for the ranges (as channel_keys._quantize_keys)
                full = mx.concatenate([mx.repeat(full[:, :, c.sinks:c.sinks + 1], c.sinks, 2),
                                       full[:, :, c.sinks:]], axis=2)
            if c.rotate:
                full = full @ hadamard(k.shape[-1])
            B, H, _, D = full.shape
            blocks = full.reshape(B, H, nfull, c.block, D)
            deq = affine(blocks, 3, 4, c.k_meta).reshape(B, H, nfull * c.block, D)
            if c.rotate:
                deq = deq @ hadamard(k.shape[-1]).T
            if c.sinks:
                deq = mx.concatenate([k[:, :, : c.sinks], deq[:, :, c.sinks:]], axis=2)
            return mx.concatenate([deq, k[:, :, nfull * c.block:]], axis=2)

    return FakeQuantCache


def score_text(model, ids, candidates, context, n_windows, chunk, cache_cls):
    """Per candidate: (delta %, mean KL) against full precision over the first windows of the text."""
    from mlx_lm.models.cache import KVCache

    nll = {c.name: 0.0 for c in candidates}
    kl = dict(nll)
    nll_ref, n = 0.0, 0
    wins = [ids[i:i + context] for i in range(0, len(ids) - context + 1, context)][:n_windows]
    for w in wins:
        caches = {None: [KVCache() for _ in model.layers]}
        caches.update({c.name: [cache_cls(c) for _ in model.layers] for c in candidates})
        targets = mx.array(w[1:])[:, None]
        for start in range(0, len(w), chunk):
            end = min(len(w), start + chunk)
            toks = mx.array(w[start:end])[None]
            m = min(end, len(w) - 1) - start
            t = targets[start:start + m]
            lr = model(toks, cache=caches[None])[0, :m]
            lr = lr - mx.logsumexp(lr, axis=-1, keepdims=True)
            nll_ref += -mx.take_along_axis(lr, t, -1).sum().item()
            for c in candidates:
                lq = model(toks, cache=caches[c.name])[0, :m]
                lq = lq - mx.logsumexp(lq, axis=-1, keepdims=True)
                nll[c.name] += -mx.take_along_axis(lq, t, -1).sum().item()
                kl[c.name] += (mx.exp(lr) * (lr - lq)).sum().item()
            n += m
    return {c.name: (100 * (math.exp((nll[c.name] - nll_ref) / n) - 1), kl[c.name] / n) for c in candidates}, len(wins)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--only", default="", help="comma-separated candidate names")
    ap.add_argument("--texts", default="", help="comma-separated text file names (default: all)")
    args = ap.parse_args()
    from zkv_mlx.models.loader import load_model

    lm = load_model(None)
    cands = [c for c in CANDIDATES if not args.only or c.name in args.only.split(",")]
    cls = make_cache_class()
    res, nwin = {}, {}
    for name in [t for t in CHOOSING + HELD_OUT if not args.texts or t in args.texts.split(",")]:
        t0 = time.perf_counter()
        ids = lm.tokenizer.encode((TEXTS / name).read_text(encoding="utf-8"))
        res[name], nwin[name] = score_text(lm.model, ids, cands, args.context, args.windows, args.chunk, cls)
        print(f"{name}: {nwin[name]} windows, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    texts = list(res)
    fit = [c for c in cands if c.bits() / 32 <= 0.30]
    chosen = min(fit, key=lambda c: sum(res[t][c.name][0] for t in CHOOSING if t in res)) if fit else None
    head = "| candidate | bits/elem (K+V) | x fp16 | " + " | ".join(
        f"{t} ({'CHOOSING' if t in CHOOSING else 'held out'}, {nwin[t]} win)" for t in texts) + " |"
    print(head)
    print("|" + "---|" * (3 + len(texts)))
    for c in cands:
        cells = [f"{res[t][c.name][0]:+.2f}% / {res[t][c.name][1]:.4f}" for t in texts]
        mark = " **chosen**" if c is chosen else ""
        print(f"| {c.name}{mark} | {c.bits():.3g} | {c.bits() / 32:.3f} | " + " | ".join(cells) + " |")
    print(f"\ncells: perplexity delta vs full precision / mean KL; chosen: {chosen and chosen.name} (lowest mean "
          f"delta on the CHOOSING texts among candidates <= 0.30x fp16)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
