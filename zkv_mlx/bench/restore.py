"""`zkv-mlx bench restore`: recompute a long conversation (prefill + first token) vs restore its session file
from disk (read + load into the pool + first token), alternating rounds in one process. Last line:
{"tokens", "rounds", "restores", "recompute_s", "restore_s", "speedup", "file_bytes", "read_gb_s", "load_s", "first_token_s",
"memory_hit_s"} (medians). restore_s = load_s (read, checksums, copy into the pool) + first_token_s (the first
token after the restore); memory_hit_s is the first token of the same prompt again right after, its blocks
already in memory (a prefix hit of the same length): the restore's first token should be no slower. Each round
recomputes once and restores --restores times (one row per restore); the restore medians are over all of them."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ..errors import ConfigError
from .common import bench_tokens, emit, log, machine, median


def _first_token(model, ids) -> float:
    t0 = time.perf_counter()
    for ev in model.submit(ids, temperature=0.0, max_tokens=1, ignore_eos=True):
        if ev.kind == "error":
            raise ev.error
    return time.perf_counter() - t0


def run(args) -> int:
    from ..cli_common import open_model
    from ..session import Session
    from ..saved_sessions import read_file

    if args.tokens < 1 or args.rounds < 1 or args.restores < 1:
        raise ConfigError(f"--tokens, --rounds and --restores must be >= 1 (got {args.tokens}, {args.rounds}, "
                         f"{args.restores}); e.g. --tokens 4096 --rounds 3 --restores 3")
    if args.max_context is None:
        args.max_context = args.tokens + 64
    # Cold figures must be cold: the SSD tier would serve the "cleared" blocks back from disk.
    if args.ssd_cache is None:
        args.ssd_cache = "off"
    log(args, "loading zkv engine...")
    model = open_model(args)
    ids = bench_tokens(model.tokenizer, args.tokens)
    tmp = Path(tempfile.mkdtemp(prefix="zkv-bench-"))
    f = tmp / "bench.zkvs"
    rec, res, reads, loads, firsts, hits = [], [], [], [], [], []
    try:
        _first_token(model, ids[:64])  # warm-up
        for r in range(args.rounds):
            model.clear_kv_cache()
            rec.append(_first_token(model, ids))
            if r == 0:  # the session file holds exactly what the recompute produced
                Session(model, "bench", "local", [], ids).save(f)
            # A restore costs ~0.1 s and a recompute 20-100 s: each round restores --restores times, so the
            # restore medians stand on rounds x restores samples (a 0.1 s figure on a shared machine needs them).
            for _ in range(args.restores):
                model.clear_kv_cache()
                t0 = time.perf_counter()
                read_file(f)
                reads.append(time.perf_counter() - t0)
                model.clear_kv_cache()
                t0 = time.perf_counter()
                restored = model.load_session(str(f))
                loads.append(time.perf_counter() - t0)
                firsts.append(_first_token(model, ids))
                res.append(time.perf_counter() - t0)
                hits.append(_first_token(model, ids))
                model.close_session(restored.name)
                row = {"round": r, "recompute_s": round(rec[-1], 3), "restore_s": round(res[-1], 3),
                       "read_s": _sig(reads[-1]), "load_s": _sig(loads[-1]), "first_token_s": _sig(firsts[-1]),
                       "memory_hit_s": _sig(hits[-1])}
                emit(row) if args.json else log(args, str(row))
        size = f.stat().st_size
    finally:
        model.close()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    emit({
        "tokens": args.tokens,
        "rounds": args.rounds,
        "restores": args.restores,
        "recompute_s": _sig(median(rec)),
        "restore_s": _sig(median(res)),
        "speedup": round(median(rec) / median(res), 1),
        "file_bytes": size,
        "read_gb_s": _sig(size / median(reads) / 1e9),
        "load_s": _sig(median(loads)),
        "first_token_s": _sig(median(firsts)),
        "memory_hit_s": _sig(median(hits)),
        "machine": machine(),
    })
    return 0


def _sig(x: float) -> float:
    # four significant digits: a small file read in microseconds must not print as 0.0 GB/s or 0.0 s
    return float(f"{x:.4g}")
