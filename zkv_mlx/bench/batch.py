"""`zkv-mlx bench batch`: continuous batching. Tokens/s of one greedy stream alone vs the total tokens/s of N
concurrent greedy streams of the same length, each submitted from its own thread (as the server does).

Rounds alternate single and batched in one process; every stream of every round has its own prompt (distinct
windows of the bench text), so no prefix-cache hit helps either side. `*_tok_s` is decode throughput while every
stream is generating (from the last stream's first token to the first stream's last token: the steady state that
continuous batching speeds up); `*_e2e_tok_s` runs from submission to the last token, prefills included.
Last line: {"streams", "single_tok_s", "batched_tok_s", "speedup", ...} (medians; "speedup" is the ratio of the
medians, "paired_speedup" the median of each round's own ratio).

"model_speedup_ceiling" is what the model alone allows: the same weights run by mlx-lm (its own KV caches, greedy
argmax, no engine) one decode step for 1 sequence vs for N, measured after each round's engine rounds, median
step times (`model_step_ms_1`, `model_step_ms_n`); `fraction_of_ceiling` is the median over rounds of the engine's
speedup over that round's ceiling. The engine's speedup can approach it but not pass it: the rest of the step is
the model.

Without --kv-cache-memory the pool is sized for N full streams (`kv_blocks`): the engine's "dynamic" default holds
four contexts, so 8 streams would preempt each other (recompute) and measure that instead of batching;
`preemptions` counts those of the whole run, warm-up included (0 is the clean case).
"""

from __future__ import annotations

import threading
import time

from .common import bench_tokens, emit, log, machine, median


def _stream(model, prompt: list[int], tokens: int, start: threading.Barrier | None, out: list, i: int) -> None:
    if start is not None:
        start.wait()
    stamps = []
    for ev in model.submit(prompt, temperature=0.0, max_tokens=tokens, ignore_eos=True):
        if ev.kind == "error":
            out[i] = ev.error
            return
        if ev.token_id is not None:
            stamps.append(time.perf_counter())
    out[i] = stamps


def _round(model, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    """(steady-state decode tokens/s, end-to-end tokens/s) of `prompts` run concurrently (one thread each)."""
    out: list = [None] * len(prompts)
    start = threading.Barrier(len(prompts) + 1)
    threads = [threading.Thread(target=_stream, args=(model, p, tokens, start, out, i))
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    for r in out:
        if isinstance(r, BaseException):
            raise r
    e2e = sum(len(st) for st in out) / (max(st[-1] for st in out) - t0)
    start, end = max(st[0] for st in out), min(st[-1] for st in out)
    n = sum(1 for st in out for t in st if start < t <= end)
    return (n / (end - start) if end > start else float("nan")), e2e


def _model_step_ms(model, batch: int, steps: int = 12) -> float:
    """Median ms of one greedy decode step of the bare mlx-lm model for `batch` sequences at a 32-token context."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    y = mx.argmax(model(mx.zeros((batch, 32), dtype=mx.int32) + 17, cache=cache)[:, -1], axis=-1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(y)
        times.append(time.perf_counter() - t0)
    return median(times) * 1e3


def _model_steps(bare, streams: int) -> tuple[float, float]:
    """(ms of one step for 1 sequence, ms for `streams`) of the bare model, measured back to back."""
    return _model_step_ms(bare, 1), _model_step_ms(bare, streams)


def _blocks_needed(streams: int, max_context: int, block_size: int) -> int:
    """KV blocks for `streams` sequences of `max_context` tokens each (+1 block each: the slot being written)."""
    return streams * (-(-max_context // block_size) + 1)


def _open_for_streams(args, open_model, streams: int):
    """The engine, with a KV pool that holds `streams` full streams unless --kv-cache-memory was given.

    The pool's size is only known once the model is loaded (bytes per block): a pool too small for the streams
    is reopened with the memory they need (`kv_cache_memory` in bytes).
    """
    model = open_model(args)
    if args.kv_cache_memory is not None:
        return model
    st = model.kv_cache_stats()
    need = _blocks_needed(streams, args.max_context, st["block_size"])
    if st["blocks_total"] >= need:
        return model
    per_block = -(-st["total_size"] // max(1, st["blocks_total"]))
    model.close()
    args.kv_cache_memory = need * per_block
    log(args, f"reopening with a KV pool of {need} blocks ({args.kv_cache_memory} bytes) for {streams} streams")
    return open_model(args)


def run(args) -> int:
    from ..cli_common import open_model

    streams, plen = args.streams, args.prompt_tokens
    if streams < 1 or args.tokens < 1 or plen < 1 or args.rounds < 1:
        raise SystemExit("--streams, --tokens, --prompt-tokens and --rounds must be >= 1")
    if args.max_num_seqs is None:
        args.max_num_seqs = max(streams, 16)
    if args.max_context is None:
        args.max_context = plen + args.tokens + 16
    log(args, "loading zkv engine...")
    model = _open_for_streams(args, open_model, streams)
    # One distinct prompt per stream per round (+1 for the single stream, +1 round for the warm-up).
    per_round = streams + 1
    text = bench_tokens(model.tokenizer, plen * per_round * (args.rounds + 1))
    windows = [text[i * plen:(i + 1) * plen] for i in range(per_round * (args.rounds + 1))]
    _round(model, windows[:streams], min(args.tokens, 8))  # warm-up: kernels, allocator, batch shapes
    from ..models.loader import load_model

    # the bare model beside the engine: its ceiling is measured in every round, next to the engine's rounds
    bare = load_model(args.model, model.config.weights_dtype).model
    _model_steps(bare, streams)  # warm-up
    singles, batched, singles_e2e, batched_e2e, one, many = [], [], [], [], [], []
    for r in range(args.rounds):
        w = windows[per_round * (r + 1): per_round * (r + 2)]
        d, e = _round(model, w[:1], args.tokens)
        singles.append(d)
        singles_e2e.append(e)
        d, e = _round(model, w[1:], args.tokens)
        batched.append(d)
        batched_e2e.append(e)
        m1, mn = _model_steps(bare, streams)
        one.append(m1)
        many.append(mn)
        row = {"round": r, "single_tok_s": round(singles[-1], 2), "batched_tok_s": round(batched[-1], 2),
               "single_e2e_tok_s": round(singles_e2e[-1], 2), "batched_e2e_tok_s": round(batched_e2e[-1], 2),
               "model_speedup_ceiling": round(streams * m1 / mn, 2)}
        emit(row) if args.json else log(args, str(row))
    weights = model.info["weights"]
    st = model.kv_cache_stats()
    model.close()
    single, batch = median(singles), median(batched)
    speedups = [b / a for a, b in zip(singles, batched)]
    ceilings = [streams * a / b for a, b in zip(one, many)]
    emit({
        "streams": streams,
        "single_tok_s": round(single, 2),
        "batched_tok_s": round(batch, 2),
        "speedup": round(batch / single, 2),
        # each round's batched over its single rate (run back to back): steadier than the ratio of medians when the
        # machine's load drifts between rounds
        "speedup_per_round": [round(x, 2) for x in speedups],
        "paired_speedup": round(median(speedups), 2),
        "single_e2e_tok_s": round(median(singles_e2e), 2),
        "batched_e2e_tok_s": round(median(batched_e2e), 2),
        "e2e_speedup": round(median(batched_e2e) / median(singles_e2e), 2),
        "model_step_ms_1": round(median(one), 1),
        "model_step_ms_n": round(median(many), 1),
        "model_speedup_ceiling": round(streams * median(one) / median(many), 2),
        "model_ceiling_per_round": [round(x, 2) for x in ceilings],
        # the engine's speedup as a fraction of what the model allowed in the same round
        "fraction_of_ceiling": round(median([x / c for x, c in zip(speedups, ceilings)]), 3),
        "kv_blocks": st["blocks_total"],
        "preemptions": st["preemptions"],
        "tokens": args.tokens,
        "prompt_tokens": plen,
        "rounds": args.rounds,
        "weights": weights,
        "machine": machine(),
    })
    return 0
