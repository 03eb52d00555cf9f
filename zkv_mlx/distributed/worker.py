"""Ranks > 0: load this rank's shard, then serve rank 0's plans (`plan.py`) until rank 0 closes the job."""

from __future__ import annotations

import os
import sys

import mlx.core as mx

from ..engine.runner import ModelRunner
from ..errors import ZkvError
from . import plan as P
from .group import DistGroup, current_group, rank_line
from .leader import DTYPES, export_gathered, gather_stats, import_sharded, ssd_opened
from .load import load_shard
from .snapshots import WorkerSnapshots
from .tiers import RankTier, open_rank_ssd


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


# Collectives in which a rank > 0 waits for rank 0 alone: losing the job there means rank 0 ended (it refused the
# settings or a session file, or stopped), and rank 0's own output says why.
WAITS_FOR_RANK_0 = ("the start-up check", "start-up", "waiting for rank 0's next plan")


def run_worker(cfg, group: DistGroup) -> int:
    """Serves until rank 0 sends CLOSE (returns 0) or the job fails (prints why in one line, returns 1)."""
    try:
        lm = load_shard(cfg, group)
        num_blocks, block_size, dtype, n_win, *wins = group.send_ints(None, "start-up", watchdog=False)
        window_blocks = {wins[2 * i]: wins[2 * i + 1] for i in range(n_win)}
        runner = ModelRunner(lm, num_blocks, block_size, DTYPES[dtype], kv=cfg.kv, window_blocks=window_blocks)
        if runner.snapshots_ok:  # hybrid models: this rank's snapshots of its state shard
            runner.snapshots = WorkerSnapshots(block_size)
        serve(runner, group, cfg)
        return 0
    except ZkvError as e:
        if e is group.failed and group.failed_during in WAITS_FOR_RANK_0:
            who = "rank 0" if group.size == 2 else "rank 0 (or another rank)"
            e = ZkvError(f"{who} ended (see its message); this rank exits too")
        print(rank_line(group.rank, e), file=sys.stderr, flush=True)
        return 1


def serve(runner: ModelRunner, group: DistGroup, cfg) -> None:
    """The plan loop: one message, the same call as rank 0's on this rank's shard, its output evaluated; until
    CLOSE. `cfg`: this rank's own settings (its SSD directory)."""
    w = _Worker(runner, group, cfg)
    try:
        while w.step():
            pass
    finally:
        if w.tier is not None:
            w.tier.ssd.close()  # queued spills reach this rank's disk before the process ends


class _Worker:
    def __init__(self, runner: ModelRunner, group: DistGroup, cfg):
        self.runner, self.group, self.cfg = runner, group, cfg
        self.shadows: dict[int, P.ShadowSeq] = {}
        self.tier: RankTier | None = None  # this rank's SSD store, once rank 0 opens the tier

    def step(self) -> bool:
        """Serves one plan message; False after CLOSE."""
        runner, group, shadows = self.runner, self.group, self.shadows
        # no watchdog while waiting: rank 0 may be idle for hours; it notices a vanished rank on its next plan
        msg = group.send_ints(None, "waiting for rank 0's next plan", watchdog=False)
        r = P.Reader(msg)
        op = r.int()
        if op == P.PREFILL:
            self._drops(r)
            seq, start, end, all_logits = P.apply_prefill(r, shadows)
            self._replay(r)
            seq.restore_hash = P.read_hash(r)
            if seq.restore_hash is not None:
                seq.state = None  # resumed from that snapshot, as on rank 0 (even if this rank kept a state)
            out = runner.prefill(seq, start, end, all_logits)
        elif op == P.DECODE:
            self._drops(r)
            seqs, tokens = P.apply_decode(r, shadows)
            self._replay(r)
            out = runner.decode(seqs, mx.array(tokens, dtype=mx.int32))
        else:
            return self._other(op, r)
        group._run(P.OP_NAMES[op], [out, *[m for m in (runner.mass or []) if m is not None]])
        return True

    def _drops(self, r: P.Reader) -> None:
        for sid in P.apply_drops(r, self.shadows):
            if self.runner.snapshots is not None:
                self.runner.snapshots.forget(sid)

    def _replay(self, r: P.Reader) -> None:
        # the window tables rank 0's window groups chose for this call (this rank's maps stay unused)
        calls = P.read_windows(r)
        if self.runner.windows is not None:
            self.runner.windows.replay = calls

    def _other(self, op: int, r: P.Reader) -> bool:
        runner, group = self.runner, self.group
        if op == P.COPY:
            runner.copy_block(r.int(), r.int())
        elif op == P.SHIFT:
            delta = r.int()
            runner.shift_keys(r.ints(), delta)
        elif op == P.EXPORT:
            export_gathered(group, runner.pool, r.ints())
        elif op == P.IMPORT:
            code = r.int()
            import_sharded(group, runner.pool, r.ints(), code, None, None)
        elif op == P.STATS:
            if self.tier is not None:
                self.tier.ssd.flush()
            gather_stats(group, runner, None if self.tier is None else self.tier.ssd)
        elif op == P.SSD_OPEN:
            self._open_ssd()
        elif op == P.SPILL:
            self.tier.spill(*P.read_block(r))
        elif op == P.PROMOTE:
            self.tier.promote(*P.read_block(r))
        elif op == P.FLUSH:
            self.tier.flush()
        elif op in (P.SNAP_CAPTURE, P.SNAP_PUT, P.SNAP_DROP):
            runner.snapshots.apply(op, r, self.shadows)
        elif op == P.CLOSE:
            return False
        else:
            raise ZkvError(f"rank {group.rank}: unknown plan operation {op} from rank 0 (mismatched zkv-mlx?)")
        return True

    def _open_ssd(self) -> None:
        ssd = None
        try:
            ssd = open_rank_ssd(self.cfg.tiers, self.runner.pool, self.runner.lm.fingerprint, self.group,
                                self.cfg.distributed_split)
        except ZkvError as e:  # reported here; rank 0 names this rank and stops the job
            print(rank_line(self.group.rank, e), file=sys.stderr, flush=True)
        if ssd_opened(self.group, ssd is not None):
            raise ZkvError(f"rank {self.group.rank}: a rank could not open its SSD store; rank 0 stops the job")
        self.tier = RankTier(ssd, self.runner.pool, self.group)
