"""Issue #19: every candidate 4-bit KV format on every text, by fake quantization (quantize then dequantize).

Each candidate is an mlx-lm cache (`FakeQuantCache`) that stores full-precision K/V and hands the model the
dequantized version, with the engine's semantics: keys per channel over the tokens of each *full* block, the
partial tail block and the first `sinks` positions in full precision (storage/channel_keys.py); values per token
in groups along head_dim. Chunked prefill (128 tokens) with write-then-attend, as `zkv-mlx eval ppl`.

CHOOSING texts pick the default (lowest mean delta among candidates within 9.6 bits per element, 0.30x fp16);
HELD-OUT texts are only reported. The chosen format is then measured for real with `zkv-mlx eval ppl --kv-quant int4`.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python docs/experiments/kv_candidates.py [--set first|second|all]
        [--windows 3] [--texts a.txt,b.txt] [--only "NAME|NAME"] > table.md
    OPENBLAS_NUM_THREADS=1 .venv/bin/python docs/experiments/kv_candidates.py --sensitivity --windows 1 \
        --texts python-license.txt      # one layer's keys (then values) quantized at a time
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
N_LAYERS = 30
BUDGET_BITS = 9.6  # issue #19: K + V bits per element <= 0.30x fp16


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
    k8: tuple[int, ...] = ()  # layers whose keys are 8-bit (same layout and metadata), mixed precision by layer
    v8: tuple[int, ...] = ()  # layers whose values are 8-bit
    only: tuple[int, str] | None = None  # (layer, "k" | "v"): quantize just that (per-layer sensitivity)
    pre_rope: bool = False  # KVQuant: per-channel keys quantized before RoPE (rotated back after dequantizing)
    v_rotate: bool = False  # QuaRot-style: values Hadamard-rotated along head_dim before the per-token groups
    k_outliers: float = 0.0  # KVQuant dense-and-sparse: this fraction of each key block kept exact (sparse)

    def bits(self) -> float:
        """K + V bits per element, every scale and bias included (tail and sinks are per sequence), averaged
        over the layers (8-bit layers have float16 scale and bias: an 8-bit zero point cannot cover every
        range); a sparse outlier costs 32 bits (a float16 value and a 16-bit position)."""
        meta = {"f16": 32, "u8": 16}
        k4 = 4 + meta[self.k_meta] / self.block
        k = (k4 * (N_LAYERS - len(self.k8)) + (8 + 32 / self.block) * len(self.k8)) / N_LAYERS
        v4 = 4 + {"mxfp4": 8 / 32, "nvfp4": 8 / 16}.get(self.v_meta, meta.get(self.v_meta, 0) / self.v_group)
        v = (v4 * (N_LAYERS - len(self.v8)) + (8 + 32 / self.v_group) * len(self.v8)) / N_LAYERS
        return round(k + 32 * self.k_outliers + v, 6)


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

# Second search (w/qsearch). Levers and their sources:
# - per-channel keys, per-token values, recent tokens in full precision: KIVI (Liu et al. 2024, arXiv:2402.02750)
# - keys quantized before RoPE; dense-and-sparse key outliers: KVQuant (Hooper et al. 2024, arXiv:2401.18079)
# - Hadamard rotation before quantizing (here: of the values, per token): QuaRot (Ashkboos et al. 2024,
#   arXiv:2404.00456)
# - full-precision attention-sink tokens: StreamingLLM (Xiao et al. 2023, arXiv:2309.17453)
# - mixed precision by layer: the layers with the largest one-layer-at-a-time KL (--sensitivity) at 8 bits
# From `--sensitivity --windows 1 --texts python-license.txt` (CHOOSING; docs/experiments/kv_sensitivity.md), by
# mean KL with one layer's keys or values at 4 bits: keys of layers 10, 1, 20, 23 and values of layer 1 lead.
K8_LAYERS = (1, 10, 20, 23)  # the 4 largest key KLs: 4 x 4.5 bits / 30 layers = +0.6 bits
MIX_K8, MIX_V8 = (1, 10, 20), (1,)  # the 4 largest of all 60 (K and V) KLs
SECOND = [
    Candidate("c32 u8 / v g32 u8", 32, "u8", 32, "u8"),
    Candidate("c16 u8 / v g32 u8", 16, "u8", 32, "u8"),
    Candidate("c16 u8 / v g64 f16", 16, "u8", 64, "f16"),
    Candidate("c32 u8 / v g16 u8", 32, "u8", 16, "u8"),
    Candidate("c32 u8 pre-RoPE / v g32 f16", 32, "u8", 32, "f16", pre_rope=True),
    Candidate("c32 u8 pre-RoPE / v g32 u8", 32, "u8", 32, "u8", pre_rope=True),
    Candidate("c32 u8 / v g32 u8 rotated", 32, "u8", 32, "u8", v_rotate=True),
    Candidate("c32 u8 / v g32 f16 rotated", 32, "u8", 32, "f16", v_rotate=True),
    Candidate("c32 u8 + 1% outliers / v g32 u8", 32, "u8", 32, "u8", k_outliers=0.01),
    Candidate("c32 u8 / v g32 f16, 8 sinks", 32, "u8", 32, "f16", sinks=8),
    Candidate("c32 u8 K8x4 / v g32 u8", 32, "u8", 32, "u8", k8=K8_LAYERS),
    Candidate("c32 u8 K8x3 / v g32 u8 V8x1", 32, "u8", 32, "u8", k8=MIX_K8, v8=MIX_V8),
    Candidate("c32 u8 pre-RoPE K8x3 / v g32 u8 V8x1", 32, "u8", 32, "u8", k8=MIX_K8, v8=MIX_V8, pre_rope=True),
    Candidate("c32 u8 K8x3 / v g32 u8 rotated V8x1", 32, "u8", 32, "u8", k8=MIX_K8, v8=MIX_V8, v_rotate=True),
]

# The second search's stage 1 (docs/benchmarks.md): the first search's pick, the old default and SECOND less
# "c16 u8 / v g64 f16" and the two 9.0-bit pre-RoPE / rotated rows without mixed layers
STAGE1 = [
    'c32 u8 / v g32 f16',
    'c32 f16 / v g64 f16 (old default)',
    'c32 u8 / v g32 u8',
    'c16 u8 / v g32 u8',
    'c32 u8 / v g16 u8',
    'c32 u8 pre-RoPE / v g32 f16',
    'c32 u8 / v g32 f16 rotated',
    'c32 u8 + 1% outliers / v g32 u8',
    'c32 u8 / v g32 f16, 8 sinks',
    'c32 u8 K8x4 / v g32 u8',
    'c32 u8 K8x3 / v g32 u8 V8x1',
    'c32 u8 pre-RoPE K8x3 / v g32 u8 V8x1',
    'c32 u8 K8x3 / v g32 u8 rotated V8x1',
]


def outlier_mask(blocks: mx.array, frac: float) -> mx.array:
    """KVQuant's dense-and-sparse split (Hooper et al. 2024, arXiv:2401.18079, section 3.4), per key block: the
    `frac` of a block's values (per head) farthest from their channel's mean over the block are outliers, kept
    exact; the rest is quantized with ranges that ignore them. blocks: [B, H, nb, BS, D]; returns a bool mask."""
    dev = mx.abs(blocks - blocks.mean(axis=3, keepdims=True))
    B, H, nb, bs, D = blocks.shape
    n = max(1, round(frac * bs * D))
    flat = dev.reshape(B, H, nb, bs * D)
    thr = mx.sort(flat, axis=-1)[..., -n][..., None]
    return (flat >= thr).reshape(blocks.shape)


def make_cache_class(rope_base: float, traditional: bool):
    import mlx_lm.models.llama as llama
    from mlx_lm.models.cache import KVCache

    from zkv_mlx.kernels import prefill_attention_reference

    def sdpa(q, k, v, cache=None, scale=1.0, mask=None, sinks=None):
        # the engine's CPU prefill attention (GEMMs + polynomial exp): MLX's CPU sdpa is ~4x slower here
        return prefill_attention_reference(q, k, v, scale)

    llama.scaled_dot_product_attention = sdpa

    def rope(x, sign):  # rotate cached keys (positions 0..T-1) by +-position: scale -1 undoes the model's RoPE
        return mx.fast.rope(x, x.shape[-1], traditional=traditional, base=rope_base, scale=sign, offset=0)

    class FakeQuantCache(KVCache):
        """mlx-lm KVCache that returns the candidate's dequantized K/V (full precision kept underneath)."""

        def __init__(self, c: Candidate, layer: int):
            super().__init__()
            self.c, self.layer = c, layer

        def update_and_fetch(self, keys, values):
            k, v = super().update_and_fetch(keys, values)  # [B, H, T, D] raw
            c, L = self.c, self.layer
            if c.only is not None and c.only[0] != L:
                return k, v
            if c.only is None or c.only[1] == "k":
                k = self._keys(k, *((8, "f16") if L in c.k8 else (4, c.k_meta)))
            if c.only is None or c.only[1] == "v":
                bits, meta = (8, "f16") if L in c.v8 else (4, c.v_meta)
                if c.v_rotate:
                    h = hadamard(v.shape[-1])
                    v = tokens(v @ h, bits, c.v_group, meta) @ h.T
                else:
                    v = tokens(v, bits, c.v_group, meta)
            return k, v

        def _keys(self, k, bits, meta):
            c, T = self.c, k.shape[2]
            nfull = T // c.block
            if nfull == 0:
                return k
            full = k[:, :, : nfull * c.block]
            if c.pre_rope:
                full = rope(full, -1.0)
            if c.sinks:
                # sink rows take the next row's value for the ranges (as channel_keys._quantize_keys)
                full = mx.concatenate([mx.repeat(full[:, :, c.sinks:c.sinks + 1], c.sinks, 2),
                                       full[:, :, c.sinks:]], axis=2)
            if c.rotate:
                full = full @ hadamard(k.shape[-1])
            B, H, _, D = full.shape
            blocks = full.reshape(B, H, nfull, c.block, D)
            if c.k_outliers:
                out = outlier_mask(blocks, c.k_outliers)
                mean = blocks.mean(axis=3, keepdims=True)
                lo = mx.where(out, mean, blocks)  # ranges without the outliers ...
                deq = mx.where(out, blocks, affine_ranges(blocks, lo, bits, meta))  # ... which stay exact
            else:
                deq = affine(blocks, 3, bits, meta)
            deq = deq.reshape(B, H, nfull * c.block, D)
            if c.rotate:
                deq = deq @ hadamard(k.shape[-1]).T
            if c.pre_rope:
                deq = rope(deq, 1.0)
            if c.sinks:
                deq = mx.concatenate([k[:, :, : c.sinks], deq[:, :, c.sinks:]], axis=2)
            return mx.concatenate([deq, k[:, :, nfull * c.block:]], axis=2)

    return FakeQuantCache


def affine_ranges(x: mx.array, inliers: mx.array, bits: int, meta: str) -> mx.array:
    """`affine` over axis 3 with the ranges taken from `inliers` (the same shape; outliers replaced)."""
    levels = (1 << bits) - 1
    lo, hi = inliers.min(axis=3, keepdims=True), inliers.max(axis=3, keepdims=True)
    s = _round_meta(mx.maximum((hi - lo) / levels, 1e-6), meta)
    if meta == "f16":
        b = lo.astype(mx.float16).astype(mx.float32)
        return mx.clip(mx.round((x - b) / s), 0, levels) * s + b
    z = mx.clip(mx.round(-lo / s), -128, 127)
    return (mx.clip(mx.round(x / s) + z, 0, levels) - z) * s


def score_text(model, ids, candidates, context, n_windows, chunk, cache_cls):
    """Per candidate: (delta %, mean KL) against full precision over the first windows of the text.

    Candidates run one after another over a window (the reference log-probabilities are kept), so memory holds
    one candidate's cache at a time."""
    from mlx_lm.models.cache import KVCache

    nll = {c.name: 0.0 for c in candidates}
    kl = dict(nll)
    nll_ref, n = 0.0, 0
    wins = [ids[i:i + context] for i in range(0, len(ids) - context + 1, context)][:n_windows]

    def run(w, cache, ref=None):
        # chunked prefill; returns per chunk the normalized log-probs of the predicted positions
        out, targets = [], mx.array(w[1:])[:, None]
        for i, start in enumerate(range(0, len(w), chunk)):
            end = min(len(w), start + chunk)
            m = min(end, len(w) - 1) - start
            lq = model(mx.array(w[start:end])[None], cache=cache)[0, :m]
            lq = lq - mx.logsumexp(lq, axis=-1, keepdims=True)
            t = targets[start:start + m]
            nl = -mx.take_along_axis(lq, t, -1).sum()
            if ref is None:
                mx.eval(lq, nl)
                out.append((lq, nl.item()))
            else:
                lr = ref[i][0]
                out.append((None, nl.item(), (mx.exp(lr) * (lr - lq)).sum().item()))
        return out

    for w in wins:
        ref = run(w, [KVCache() for _ in model.layers])
        nll_ref += sum(r[1] for r in ref)
        n += len(w) - 1
        for c in candidates:
            got = run(w, [cache_cls(c, i) for i in range(len(model.layers))], ref)
            nll[c.name] += sum(g[1] for g in got)
            kl[c.name] += sum(g[2] for g in got)
    return {c.name: (100 * (math.exp((nll[c.name] - nll_ref) / n) - 1), kl[c.name] / n) for c in candidates}, len(wins)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--only", default="", help="candidate names separated by |")
    ap.add_argument("--texts", default="", help="comma-separated text file names (default: all)")
    ap.add_argument("--set", choices=["first", "second", "all", "stage1"], default="first",
                    help="the first search's candidates, the second search's (w/qsearch), both, or the 13 of the "
                         "second search's stage 1")
    ap.add_argument("--sensitivity", action="store_true",
                    help="per layer: only that layer's keys (or values) quantized (K c32 u8, V g32 u8)")
    args = ap.parse_args()
    from zkv_mlx.models.loader import load_model

    lm = load_model(None)
    cls = make_cache_class(lm.model.args.rope_theta, lm.model.args.rope_traditional)
    if args.sensitivity:
        return sensitivity(lm, cls, args)
    both = CANDIDATES + SECOND
    pool = {"first": CANDIDATES, "second": SECOND, "all": both,
            "stage1": [c for c in both if c.name in STAGE1]}[args.set]
    cands = [c for c in pool if not args.only or c.name in args.only.split("|")]
    res, nwin = {}, {}
    for name in [t for t in CHOOSING + HELD_OUT if not args.texts or t in args.texts.split(",")]:
        t0 = time.perf_counter()
        ids = lm.tokenizer.encode((TEXTS / name).read_text(encoding="utf-8"))
        res[name], nwin[name] = score_text(lm.model, ids, cands, args.context, args.windows, args.chunk, cls)
        print(f"{name}: {nwin[name]} windows, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    texts = list(res)
    fit = [c for c in cands if c.bits() <= BUDGET_BITS]
    choosing = [t for t in CHOOSING if t in res]  # no choice from held-out texts alone
    chosen = min(fit, key=lambda c: sum(res[t][c.name][0] for t in choosing)) if fit and choosing else None
    head = "| candidate | bits/elem (K+V) | x fp16 | " + " | ".join(
        f"{t} ({'CHOOSING' if t in CHOOSING else 'held out'}, {nwin[t]} win)" for t in texts) + " |"
    print(head)
    print("|" + "---|" * (3 + len(texts)))
    for c in cands:
        cells = [f"{res[t][c.name][0]:+.2f}% / {res[t][c.name][1]:.4f}" for t in texts]
        mark = " **chosen**" if c is chosen else ""
        print(f"| {c.name}{mark} | {c.bits():.3g} | {c.bits() / 32:.3f} | " + " | ".join(cells) + " |")
    print(f"\ncells: perplexity delta vs full precision / mean KL; chosen: {chosen and chosen.name} (lowest mean "
          f"delta on the CHOOSING texts among candidates <= {BUDGET_BITS} bits per element)")
    return 0


def sensitivity(lm, cls, args) -> int:
    """Prints, per layer, the delta and mean KL with only that layer's keys (then only its values) at 4 bits."""
    n = len(lm.model.layers)
    cands = [Candidate(f"L{i} {kv}", 32, "u8", 32, "u8", only=(i, kv)) for i in range(n) for kv in "kv"]
    for name in [t for t in CHOOSING if not args.texts or t in args.texts.split(",")]:
        ids = lm.tokenizer.encode((TEXTS / name).read_text(encoding="utf-8"))
        res, nw = score_text(lm.model, ids, cands, args.context, args.windows, args.chunk, cls)
        print(f"\n{name} (CHOOSING, {nw} win): one layer quantized at a time\n")
        print("| layer | K only: delta / mean KL | V only: delta / mean KL |\n|---|---|---|")
        for i in range(n):
            (dk, kk), (dv, kv) = res[f"L{i} k"], res[f"L{i} v"]
            print(f"| {i} | {dk:+.3f}% / {kk:.5f} | {dv:+.3f}% / {kv:.5f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
