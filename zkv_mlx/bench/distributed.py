"""`zkv-mlx bench distributed`: one model on N local ranks (ring backend) vs the same model in one process.

The N-rank job (`distributed_job.py`, started as mlx.launch would start it) and this process's own engine
alternate rounds (never both at once); the result line reports medians: {"one_process_tok_s",
"<N>_ranks_tok_s" (e.g. "2_ranks_tok_s"), "ratio", and per decode step the model's collectives and their payload
bytes, and the plan's}. Payload bytes are what each all_sum carries; on a ring of 2 each rank sends about that many
bytes per all_sum.

Without -m the model is a generated random-weight llama whose 4 KV heads split over 2 or 4 ranks
(`random_model.py`; written once under the cache dir): the bundled model's 3 KV heads split over 3 ranks only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import bench_tokens, emit, log, machine, median

# The generated model of docs/benchmarks.md's "Distributed" section: `python -m zkv_mlx.bench.random_model DIR`.
BENCH_MODEL = dict(family="llama", hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, seed=0)
BENCH_MODEL_TEXT = ("generated random-weight llama (python -m zkv_mlx.bench.random_model DIR: 8 layers, hidden 512, "
                    "8 heads, 4 KV heads, seed 0, bundled tokenizer)")


def bench_model(log_to=None) -> Path:
    """The generated benchmark llama under the cache dir (`bench-models/`), written on first use.

    Returns:
        Its directory. Written to a temporary directory first and renamed, so an interrupted write never
        leaves a half model behind.
    """
    from .. import paths
    from .random_model import write

    name = "llama-{layers}x{hidden}-kv{kv_heads}-seed{seed}".format(**BENCH_MODEL)
    final = paths.cache_dir() / "bench-models" / name
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if log_to is not None:
        log(log_to, f"writing the benchmark model to {final} (once)...")
    tmp = Path(tempfile.mkdtemp(prefix=name + ".", dir=final.parent))
    try:
        write(tmp, **BENCH_MODEL)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide it from other users of a shared cache dir
        tmp.rename(final)
    except OSError:
        if not (final / "config.json").is_file():  # not another process that wrote it first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def run(args) -> int:
    from ..api import ZKV
    from ..cli_common import engine_kwargs
    from ..distributed.load import split_refusal
    from ..errors import ConfigError

    if args.ranks < 2:
        raise ConfigError(f"--ranks {args.ranks}: a distributed run needs at least 2")
    split = args.distributed or "tensor"
    kw = {k: v for k, v in engine_kwargs(args).items() if v is not None and k not in ("distributed", "distributed_split")}
    kw.setdefault("max_context", max(args.context + args.tokens + 16, 256))
    kw.update(prompt_cache=False, ssd_cache="off")  # every round prefills the same prompt cold
    model = args.model or str(bench_model(args))
    log(args, "loading the one-process engine...")
    one = ZKV(model, config=args.config, **kw)  # the reference: one process, never --distributed
    try:
        f = one.facts
        refusal = split_refusal(f.model_name, f.family, f.n_kv_heads, args.ranks, split)
        if refusal is not None:
            raise ConfigError(refusal)
        prompt = bench_tokens(one.tokenizer, args.context)
        job = {"model": one.info["path"], "engine": dict(kw, distributed_split=split), "prompt": prompt,
               "tokens": args.tokens}
        a, b, rows = _rounds(args, one, job)
    finally:
        one.close()
    last, key = rows[-1], f"{args.ranks}_ranks_tok_s"
    emit({"context": args.context, "tokens": args.tokens, "rounds": args.rounds, "ranks": args.ranks,
          "split": split, "one_process_tok_s": round(median(a), 2), key: round(median(b), 2),
          "ratio": round(median(b) / median(a), 3),
          "model_collectives_per_step": last["model_collectives_per_step"],
          "model_bytes_per_step": last["model_bytes_per_step"],
          "plan_collectives_per_step": last["plan_collectives_per_step"],
          "plan_bytes_per_step": last["plan_bytes_per_step"],
          "model": one.info["model"], "model_path": one.info["path"],
          "model_source": "-m" if args.model else BENCH_MODEL_TEXT, "weights": one.info["weights"],
          "machine": machine()})
    return 0


def _rounds(args, one, job: dict) -> tuple[list, list, list]:
    """Alternates a round of this process's engine with a round of the N-rank job; returns their tok/s and the
    job's result rows. Raises ZkvError (one line) when the job ends early."""
    from ..distributed.local import launch_local
    from .distributed_job import timed_round

    from .. import paths

    paths.cache_dir().mkdir(parents=True, exist_ok=True)
    settings = paths.cache_dir() / "bench-distributed-job.json"
    settings.write_text(json.dumps(job))  # also what "run it by hand" reads
    log(args, f"starting the {args.ranks}-rank job...")
    errors = tempfile.TemporaryFile()  # the ranks' stderr: read when the job fails
    procs = launch_local(args.ranks, ["-m", "zkv_mlx.bench.distributed_job", str(settings)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors)
    for p in procs[1:]:
        p.stdin.close()
    timed_round(one, job["prompt"][:16], 4)  # warm-up
    a, b, rows = [], [], []
    try:
        for r in range(args.rounds):
            a.append(timed_round(one, job["prompt"], args.tokens)[0])
            line = _ask(procs[0], b"round\n")
            if not line:
                raise _ended_early(args.ranks, procs, errors, settings)
            rows.append(json.loads(line))
            b.append(rows[-1]["tok_s"])
            emit({"round": r, "one_process_tok_s": round(a[-1], 2),
                  f"{args.ranks}_ranks_tok_s": round(b[-1], 2)})
    finally:
        _ask(procs[0], b"quit\n", answer=False)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        errors.close()
    return a, b, rows


def _ask(proc, command: bytes, answer: bool = True) -> bytes:
    """Sends a command line to the job's rank 0 and reads its answer line (b"" when it has ended)."""
    try:
        proc.stdin.write(command)
        proc.stdin.flush()
        if not answer:
            proc.stdin.close()
            return b""
    except (BrokenPipeError, ValueError):  # rank 0 has ended (ValueError: its stdin is closed already)
        return b""
    return proc.stdout.readline()


def _ended_early(ranks: int, procs, errors, settings: Path):
    from ..errors import ZkvError

    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    why = _reason(errors)
    launch = Path(sys.executable).with_name("mlx.launch")
    hand = (f"{launch if launch.exists() else 'mlx.launch'} -n {ranks} --backend ring -- {sys.executable} -m "
            f"zkv_mlx.bench.distributed_job {settings} --rounds 1")
    return ZkvError(f"the {ranks}-rank job ended early ({why}); run it by hand to see every rank's output: {hand}")


def _reason(errors) -> str:
    """The ranks' reason from their stderr: rank 0's own line first (the others mostly say that rank 0 ended)."""
    errors.seek(0)
    lines = [x.strip() for x in errors.read().decode(errors="replace").splitlines() if x.strip()]
    for start in ("zkv-mlx: rank 0:", "zkv-mlx:"):
        found = [x for x in lines if x.startswith(start)]
        if found:
            return found[0].removeprefix("zkv-mlx: ")
    return lines[-1] if lines else "no rank printed a reason"  # e.g. a traceback's last line
