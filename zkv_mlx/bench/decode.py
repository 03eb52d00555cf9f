"""`zkv-mlx bench decode`: zkv's engine vs mlx-lm's `generate_step` on the same weights and dtype.

Both run in this process, alternating rounds; the result line reports medians:
{"context", "zkv_tok_s", "mlx_lm_tok_s", "ratio", "prefill_zkv_tok_s", "prefill_mlx_lm_tok_s"}; with
--kv-quant also "ratio_vs_fp16" (decode speed over the same engine with an unquantized cache) and the peak
memory of both prefills above the memory in use before them. `--contexts N,N,...`: see `decode_contexts`.
"""

from __future__ import annotations

import time

from .common import bench_tokens, emit, log, machine, median


def _zkv_round(model, prompt: list[int], tokens: int, peaks: list | None = None) -> tuple[float, float]:
    import mlx.core as mx

    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t0 = time.perf_counter()
    times = []
    handle = model.submit(prompt, temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for ev in handle:
        if ev.kind == "error":
            raise ev.error
        if ev.kind == "token":
            times.append(time.perf_counter())
            if peaks is not None and len(times) == 1:
                peaks.append(mx.get_peak_memory() - base)  # the prefill's transient memory above the pool
    prefill = len(prompt) / (times[0] - t0)
    decode = (len(times) - 1) / (times[-1] - times[0])
    return prefill, decode


def _mlx_lm_round(model, prompt: list[int], tokens: int) -> tuple[float, float]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    t0 = time.perf_counter()
    times = []
    for _token, _ in generate_step(mx.array(prompt), model, max_tokens=tokens):
        times.append(time.perf_counter())
    prefill = len(prompt) / (times[0] - t0)
    decode = (len(times) - 1) / (times[-1] - times[0])
    return prefill, decode


def _fp16_baseline(args, model, prompt):
    """The same engine with an unquantized KV cache, for "ratio_vs_fp16" and the prefill peak memory."""
    from ..api import ZKV
    from ..cli_common import engine_kwargs

    if not model.info["kv_quantized"]:
        log(args, "warning: the engine ignored --kv-quant (its runner was built without the KV config)")
    log(args, "loading the unquantized-KV engine...")
    # the baseline is an fp16 KV cache (--kv-dtype overrides it)
    kw = dict(engine_kwargs(args), kv_quant="none", kv_group_size=None, kv_dtype=args.kv_dtype or "float16")
    fp16 = ZKV(args.model, config=args.config, **kw)
    _zkv_round(fp16, prompt[:64], 4)
    return fp16


def run(args) -> int:
    if getattr(args, "contexts", None):
        from .decode_contexts import run as run_contexts

        return run_contexts(args)
    from ..cli_common import engine_kwargs, open_model
    from ..models.loader import load_model

    kw = engine_kwargs(args)
    if kw.get("max_context") is None:
        args.max_context = max(args.context + args.tokens + 16, 256)
    # Every round prefills the same prompt: with the prefix cache (or the SSD tier) on, rounds after the first
    # would be cache hits and the prefill figure meaningless. This bench measures the engine without them.
    args.prompt_cache, args.ssd_cache = False, "off"
    log(args, "loading zkv engine...")
    model = open_model(args)
    log(args, "loading mlx-lm reference model (same weights and dtype)...")
    ref = load_model(args.model, model.config.weights_dtype).model
    prompt = bench_tokens(model.tokenizer, args.context)
    quant = getattr(args, "kv_quant", None) not in (None, "none")
    fp16 = _fp16_baseline(args, model, prompt) if quant else None
    f_dec, q_peak, f_peak = [], [], []
    # Warm-up both (kernels, allocator) on a short prompt.
    _zkv_round(model, prompt[:64], 4)
    _mlx_lm_round(ref, prompt[:64], 4)
    z_pre, z_dec, m_pre, m_dec = [], [], [], []
    for r in range(args.rounds):
        p, d = _zkv_round(model, prompt, args.tokens, q_peak)
        z_pre.append(p)
        z_dec.append(d)
        if fp16 is not None:
            f_dec.append(_zkv_round(fp16, prompt, args.tokens, f_peak)[1])
        p, d = _mlx_lm_round(ref, prompt, args.tokens)
        m_pre.append(p)
        m_dec.append(d)
        row = {"round": r, "zkv_tok_s": round(z_dec[-1], 2), "mlx_lm_tok_s": round(m_dec[-1], 2),
               "prefill_zkv_tok_s": round(z_pre[-1], 1), "prefill_mlx_lm_tok_s": round(m_pre[-1], 1)}
        if args.json:
            emit(row)
        else:
            log(args, str(row))
    model.close()
    extra = {}
    if fp16 is not None:
        fp16.close()
        extra = {"kv_quant": args.kv_quant, "kv_format": model.info["kv_format"], "fp16_tok_s": round(median(f_dec), 2),
                 "baseline_kv_dtype": args.kv_dtype or "float16", "ratio_vs_fp16": round(median(z_dec) / median(f_dec), 3),
                 "prefill_peak_bytes": max(q_peak), "prefill_peak_bytes_fp16": max(f_peak)}
    result = {"context": args.context, "tokens": args.tokens, "rounds": args.rounds,
              "zkv_tok_s": round(median(z_dec), 2), "mlx_lm_tok_s": round(median(m_dec), 2),
              "ratio": round(median(z_dec) / median(m_dec), 3),
              "prefill_zkv_tok_s": round(median(z_pre), 1), "prefill_mlx_lm_tok_s": round(median(m_pre), 1),
              **extra, "weights": model.info["weights"], "machine": machine()}
    emit(result)
    return 0
