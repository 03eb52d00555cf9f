"""Ranks > 0: load this rank's shard, then serve rank 0's plans (`plan.py`) until rank 0 closes the job."""

from __future__ import annotations

import os
import sys

import mlx.core as mx

from ..engine.runner import ModelRunner
from ..errors import ZkvError
from . import plan as P
from .group import DistGroup, current_group
from .leader import DTYPES, export_gathered, gather_stats, import_sharded
from .load import load_shard


def serve_if_worker(cfg) -> None:
    """For `distributed=True`: on ranks > 0 loads this rank's shard, serves rank 0's plans until rank 0 closes,
    then ends the process (exit code 0, or 1 after a failure). Returns on rank 0 (which then starts the engine).

    Raises:
        DistributedError: not launched by mlx.launch.
    """
    group = current_group()
    if group.rank == 0:
        return
    code = run_worker(cfg, group)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # ranks > 0 never return into the caller's script


def run_worker(cfg, group: DistGroup) -> int:
    """Serves until rank 0 sends CLOSE (returns 0) or the job fails (prints why, returns 1)."""
    try:
        lm = load_shard(cfg, group)
        num_blocks, block_size, dtype = group.send_ints(None, "start-up", watchdog=False)
        runner = ModelRunner(lm, num_blocks, block_size, DTYPES[dtype], kv=cfg.kv)
        serve(runner, group)
        return 0
    except ZkvError as e:
        print(f"zkv-mlx: rank {group.rank}: {e}", file=sys.stderr, flush=True)
        return 1


def serve(runner: ModelRunner, group: DistGroup) -> None:
    """The plan loop: one message, the same runner call as rank 0's, its output evaluated; until CLOSE."""
    shadows: dict[int, P.ShadowSeq] = {}
    while True:
        # no watchdog while waiting: rank 0 may be idle for hours; it notices a vanished rank on its next plan
        msg = group.send_ints(None, "waiting for rank 0's next plan", watchdog=False)
        r = P.Reader(msg)
        op = r.int()
        if op == P.PREFILL:
            P.apply_drops(r, shadows)
            seq, start, end, all_logits = P.apply_prefill(r, shadows)
            out = runner.prefill(seq, start, end, all_logits)
        elif op == P.DECODE:
            P.apply_drops(r, shadows)
            seqs, tokens = P.apply_decode(r, shadows)
            out = runner.decode(seqs, mx.array(tokens, dtype=mx.int32))
        elif op == P.COPY:
            runner.copy_block(r.int(), r.int())
            continue
        elif op == P.SHIFT:
            delta = r.int()
            runner.shift_keys(r.ints(), delta)
            continue
        elif op == P.EXPORT:
            export_gathered(group, runner.pool, r.ints())
            continue
        elif op == P.IMPORT:
            code = r.int()
            import_sharded(group, runner.pool, r.ints(), code, None, None)
            continue
        elif op == P.STATS:
            gather_stats(group, runner)
            continue
        elif op == P.CLOSE:
            return
        else:
            raise ZkvError(f"rank {group.rank}: unknown plan operation {op} from rank 0 (mismatched zkv-mlx?)")
        group._run(P.OP_NAMES[op], [out, *[m for m in (runner.mass or []) if m is not None]])
