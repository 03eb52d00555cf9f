"""`zkv-mlx bench distributed`: one model on 2 local ranks (ring backend) vs the same model in one process.

The 2-rank job (`distributed_job.py`, started as mlx.launch would start it) and this process's own engine
alternate rounds (never both at once); the result line reports medians: {"one_process_tok_s",
"two_ranks_tok_s", "ratio", and per decode step the model's collectives and their payload bytes, and the plan's}.
Payload bytes are what each all_sum carries; on a ring of 2 each rank sends about that many bytes per all_sum.
"""

from __future__ import annotations

import json
import subprocess

from .common import bench_tokens, emit, log, machine, median


def run(args) -> int:
    from ..cli_common import engine_kwargs, open_model
    from ..distributed.local import launch_local
    from ..errors import ZkvError
    from .distributed_job import timed_round

    if args.ranks < 2:
        raise ZkvError(f"--ranks {args.ranks}: a distributed run needs at least 2")
    kw = {k: v for k, v in engine_kwargs(args).items() if v is not None and k != "distributed"}
    kw.setdefault("max_context", max(args.context + args.tokens + 16, 256))
    kw.update(prompt_cache=False, ssd_cache="off")  # every round prefills the same prompt cold
    args.max_context, args.prompt_cache, args.ssd_cache = kw["max_context"], False, "off"
    log(args, "loading the one-process engine...")
    one = open_model(args)
    prompt = bench_tokens(one.tokenizer, args.context)
    settings = {"model": one.info["path"],
                "engine": kw, "prompt": prompt, "tokens": args.tokens}
    log(args, f"starting the {args.ranks}-rank job...")
    procs = launch_local(args.ranks, ["-m", "zkv_mlx.bench.distributed_job", json.dumps(settings)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    for p in procs[1:]:
        p.stdin.close()
    timed_round(one, prompt[:16], 4)  # warm-up
    a, b, rows = [], [], []
    try:
        for r in range(args.rounds):
            a.append(timed_round(one, prompt, args.tokens)[0])
            procs[0].stdin.write(b"round\n")
            procs[0].stdin.flush()
            line = procs[0].stdout.readline()
            if not line:
                raise ZkvError("the 2-rank job ended early; run it by hand to see why: "
                               "mlx.launch -n 2 --backend ring -- python -m zkv_mlx.bench.distributed_job ...")
            rows.append(json.loads(line))
            b.append(rows[-1]["tok_s"])
            emit({"round": r, "one_process_tok_s": round(a[-1], 2), "two_ranks_tok_s": round(b[-1], 2)})
    finally:
        procs[0].stdin.write(b"quit\n")
        procs[0].stdin.close()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        one.close()
    last = rows[-1]
    emit({"context": args.context, "tokens": args.tokens, "rounds": args.rounds, "ranks": args.ranks,
          "one_process_tok_s": round(median(a), 2), "two_ranks_tok_s": round(median(b), 2),
          "ratio": round(median(b) / median(a), 3),
          "model_collectives_per_step": last["model_collectives_per_step"],
          "model_bytes_per_step": last["model_bytes_per_step"],
          "plan_collectives_per_step": last["plan_collectives_per_step"],
          "plan_bytes_per_step": last["plan_bytes_per_step"],
          "model": one.info["model"], "weights": one.info["weights"], "machine": machine()})
    return 0
