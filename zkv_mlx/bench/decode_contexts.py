"""`zkv-mlx bench decode --contexts 2048,4096,8192`: decode speed of zkv and mlx-lm at several context lengths.

One process, both engines loaded once. Per context: one cold prefill of each engine (timed: "prefill_*_tok_s",
one round; `--context N --rounds R` gives medians of cold prefills), then --rounds decode rounds that alternate
zkv, mlx-lm, zkv, ... from that prefilled state: zkv re-submits the prompt (its prefix cache hits every full block),
mlx-lm trims its prompt cache back to the prompt and feeds the last prompt token. Decode tok/s = (tokens - 1) /
(time from the first to the last token). One JSON line per round, one per finished context (its medians,
"ratio" = zkv / mlx-lm, the cold prefills), then the result with all contexts.
"""

from __future__ import annotations

import time

from .common import bench_tokens, emit, log, machine, median


def parse_contexts(text: str) -> list[int]:
    """"2048,4096" -> [2048, 4096]; ConfigError naming the bad item otherwise."""
    from ..errors import ConfigError

    out = []
    for item in text.split(","):
        try:
            n = int(item)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"--contexts {text!r}: {item.strip()!r} is not a positive integer "
                              "(give comma-separated token counts, e.g. --contexts 2048,4096,8192)")
        out.append(n)
    return out


def _timed(events) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    times = []
    for ev in events:
        if getattr(ev, "kind", "token") == "error":
            raise ev.error
        if getattr(ev, "kind", "token") == "token":
            times.append(time.perf_counter())
    return t0, times


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


class _MlxLm:
    """mlx-lm's generate_step over one prompt cache that is trimmed back to the prompt between rounds."""

    def __init__(self, model):
        self.model = model

    def cold(self, prompt: list[int], tokens: int) -> tuple[float, float]:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        self.cache, self.n = make_prompt_cache(self.model), len(prompt)
        t0, times = _timed(generate_step(mx.array(prompt), self.model, max_tokens=tokens, prompt_cache=self.cache))
        self.last = prompt[-1]
        return _rate(len(prompt), times[0] - t0), _rate(len(times) - 1, times[-1] - times[0])

    def decode(self, tokens: int) -> float:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import trim_prompt_cache

        trim_prompt_cache(self.cache, self.cache[0].offset - (self.n - 1))
        _, times = _timed(generate_step(mx.array([self.last]), self.model, max_tokens=tokens,
                                        prompt_cache=self.cache))
        return _rate(len(times) - 1, times[-1] - times[0])


def _zkv_cold(model, prompt: list[int], tokens: int) -> tuple[float, float]:
    model.clear_kv_cache()  # the contexts share their leading tokens: each cold prefill starts from nothing
    t0, times = _timed(model.submit(prompt, temperature=0.0, max_tokens=tokens, ignore_eos=True))
    return _rate(len(prompt), times[0] - t0), _rate(len(times) - 1, times[-1] - times[0])


def _zkv_decode(model, prompt: list[int], tokens: int) -> float:
    _, times = _timed(model.submit(prompt, temperature=0.0, max_tokens=tokens, ignore_eos=True))
    return _rate(len(times) - 1, times[-1] - times[0])


def run(args) -> int:
    from ..cli_common import open_model
    from ..models.loader import load_model

    contexts = parse_contexts(args.contexts)
    if getattr(args, "max_context", None) is None:
        args.max_context = max(max(contexts) + args.tokens + 16, 256)
    args.prompt_cache, args.ssd_cache = True, "off"  # decode rounds re-use the prefill through the prefix cache
    log(args, "loading zkv engine...")
    model = open_model(args)
    log(args, "loading mlx-lm reference model (same weights and dtype)...")
    ref = _MlxLm(load_model(args.model, model.config.weights_dtype).model)
    warm = bench_tokens(model.tokenizer, 64)
    _zkv_cold(model, warm, 4)
    ref.cold(warm, 4)
    rows = []
    for ctx in contexts:
        prompt = bench_tokens(model.tokenizer, ctx)
        zp, zd = _zkv_cold(model, prompt, args.tokens)
        mp, md = ref.cold(prompt, args.tokens)
        z_dec, m_dec = [], []
        for r in range(args.rounds):
            z_dec.append(_zkv_decode(model, prompt, args.tokens))
            m_dec.append(ref.decode(args.tokens))
            emit({"context": ctx, "round": r, "zkv_tok_s": round(z_dec[-1], 2), "mlx_lm_tok_s": round(m_dec[-1], 2)})
        rows.append({"context": ctx, "zkv_tok_s": round(median(z_dec), 2), "mlx_lm_tok_s": round(median(m_dec), 2),
                     "ratio": round(median(z_dec) / median(m_dec), 3), "cold_decode_zkv_tok_s": round(zd, 2),
                     "cold_decode_mlx_lm_tok_s": round(md, 2), "prefill_zkv_tok_s": round(zp, 1),
                     "prefill_mlx_lm_tok_s": round(mp, 1), "prefill_ratio": round(zp / mp, 3)})
        emit(rows[-1])  # each context's figures as soon as they exist (a long run stopped midway keeps them)
    model.close()
    emit({"contexts": rows, "tokens": args.tokens, "rounds": args.rounds, "prefill_rounds": 1,
          "weights": model.info["weights"], "machine": machine()})
    return 0
