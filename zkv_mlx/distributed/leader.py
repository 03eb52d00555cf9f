"""Rank 0's side: the engine's `ModelRunner` and KV pool, wrapped so that every call that runs the model or
touches KV blocks first sends its plan to the other ranks (`plan.py`), which make the same call on their shard.

Decode is not pipelined across steps here: each step's logits are evaluated before the call returns, so the
collectives of one step finish before the next plan is sent (every rank then sees them in the same order), and a
lost rank surfaces as a `DistributedError` inside this module rather than somewhere in the sampler.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import numpy as np

from ..engine.runner import ModelRunner
from ..errors import ConfigError, DistributedError, SessionError
from . import plan as P
from .group import DistGroup

# KV pool dtypes as sent in the start-up geometry message.
DTYPES = [mx.float16, mx.bfloat16, mx.float32]
# Numpy dtypes of exported float blocks (bfloat16 travels as its raw uint16 bits).
NP_DTYPES = [np.float16, np.uint16, np.float32]


def runner_factory(group: DistGroup, split: str = "tensor"):
    """A `make_runner` for `Engine`: sends the pool geometry to the other ranks, then builds the leader runner.
    `split`: "tensor" (each rank 1/N of the heads) or "pipeline" (each rank 1/N of the layers)."""
    def make(lm, num_blocks: int, block_size: int, kv_dtype: mx.Dtype, kv=None, window_blocks=None) -> "LeaderRunner":
        wins = [x for w, n in sorted((window_blocks or {}).items()) for x in (w, n)]
        group.send_ints([num_blocks, block_size, DTYPES.index(kv_dtype), len(wins) // 2, *wins], "start-up")
        return LeaderRunner(ModelRunner(lm, num_blocks, block_size, kv_dtype, kv=kv, window_blocks=window_blocks),
                            group, split)

    return make


class LeaderRunner:
    """`ModelRunner`'s interface on rank 0 of a distributed job (what the engine, drop and eval call).

    Args:
        inner: rank 0's own runner (its shard). group: the job's group. split: "tensor" or "pipeline".
    """

    def __init__(self, inner: ModelRunner, group: DistGroup, split: str = "tensor"):
        self.inner, self.group, self.split = inner, group, split
        self.pool = ShardedPool(inner.pool, self)
        self._live: dict[int, object] = {}  # sequences the other ranks hold state for
        self.ssd = None  # rank 0's SSD store (make_tiers)
        self.closed = False

    def __getattr__(self, name):  # lm, model, plan, block_size, batch_decode, mass: rank 0's own
        return getattr(self.inner, name)

    @property
    def snapshots(self):
        return self.inner.snapshots

    @snapshots.setter
    def snapshots(self, value) -> None:  # the engine sets the one `make_snapshots` gave it
        self.inner.snapshots = value

    def make_snapshots(self, max_bytes: int, block_size: int):
        """Hybrid models: the engine's state snapshots, every change sent to the other ranks (snapshots.py)."""
        from .snapshots import LeaderSnapshots

        return LeaderSnapshots(max_bytes, block_size, self)

    @property
    def shifts_keys(self) -> bool:
        # Long-context policies rank blocks by attention mass, which each rank sees for its heads only.
        return False

    def session_refusal(self) -> str | None:
        """Why sessions cannot be saved, exported or imported in this run (None: they can). The API refuses
        `create_session` / `load_session` with it up front, before any turn could be lost at save time."""
        inner = self.inner
        if self.split == "pipeline":
            return ("sessions cannot be saved, exported or imported in a --distributed pipeline run yet (each rank "
                    "holds the K/V of other layers)")
        if inner.plan.has_state:
            from .snapshots import _SESSIONS

            return _SESSIONS
        if inner.windows is not None:
            return ("sessions of a model with sliding-window layers cannot be saved, exported or imported in a "
                    "distributed run yet (each rank's window blocks would have to move too)")
        if inner.pool.quant is not None:
            return (f"sessions cannot be saved, exported or imported in a distributed run with a quantized KV pool "
                    f"({inner.pool.format_name}) yet; start every rank without --kv-quant")
        return None

    def policy_blocker(self) -> str:
        """Why `shifts_keys` is False here (the engine's refusal of a request's policy quotes it)."""
        return ("its KV split over the ranks of a distributed run (long-context policies are not supported in "
                "distributed mode yet: see docs/distributed.md, Limits)")

    def send(self, msg: list[int]) -> None:
        self.group.send_ints(msg, P.OP_NAMES[msg[0]])

    def _drops(self) -> list[int]:
        done = [sid for sid, s in self._live.items() if s.is_finished]
        for sid in done:
            del self._live[sid]
        return done

    def _eval(self, out: mx.array) -> mx.array:
        mass = [m for m in (self.inner.mass or []) if m is not None]
        self.group._run("a forward pass", [out, *mass])
        return out

    def _window_tables(self, prefill_args=None, seqs=None) -> list | None:
        # Rank 0's window groups choose the window tables before anything is built: the plan carries them, and
        # building the forward may already evaluate parts of it (with their collectives) -- not before the plan.
        windows = self.inner.windows
        if windows is None:
            return None
        if prefill_args is not None:
            calls = [windows.prefill_tables(*prefill_args)]
        elif self.inner.batch_decode or len(seqs) == 1:
            calls = [windows.decode_tables(seqs, [s.num_tokens - 1 for s in seqs])]
        else:  # ModelRunner.decode runs such a batch one sequence at a time
            calls = [windows.decode_tables([s], [s.num_tokens - 1]) for s in seqs]
        windows.replay = list(calls)
        return calls

    def prefill(self, seq, start: int, end: int, all_logits: bool = False) -> mx.array:
        """As `ModelRunner.prefill`, on every rank; the logits come back evaluated."""
        calls = self._window_tables(prefill_args=(seq, start, end))
        resume = None  # hybrid models: a prefix hit resumes its state from the snapshot at its end
        if self.inner.plan.has_state and start > 0 and seq.state is None:
            resume = seq.block_hashes[seq.num_computed // self.inner.snapshots.block_size - 1]
        self.send(P.encode_prefill(self._drops(), seq, start, end, all_logits) + P.encode_windows(calls)
                  + P.hash_words(resume))
        self._live[seq.seq_id] = seq
        with self._collectives("a forward pass"):  # building it may already evaluate parts (async_eval)
            out = self.inner.prefill(seq, start, end, all_logits)
        return self._eval(out)

    def decode(self, seqs: list, tokens: mx.array | None = None) -> mx.array:
        """As `ModelRunner.decode`, on every rank (tokens in flight are read first: no cross-step pipelining)."""
        values = tokens.tolist() if tokens is not None else [s.all_ids[-1] for s in seqs]
        calls = self._window_tables(seqs=seqs)
        self.send(P.encode_decode(self._drops(), seqs, values) + P.encode_windows(calls))
        for s in seqs:
            self._live[s.seq_id] = s
        with self._collectives("a forward pass"):
            out = self.inner.decode(seqs, None if tokens is None else mx.array(values, dtype=mx.int32))
        return self._eval(out)

    @contextlib.contextmanager
    def _collectives(self, what: str):
        # The ring backend reports a lost peer as a RuntimeError from whichever evaluation meets it first, which
        # may be inside the model's own code; it ends the job like a failed plan collective (DistributedError).
        try:
            yield
        except RuntimeError as e:
            if "[ring]" not in str(e) and "peer" not in str(e):
                raise
            raise self.group.lost(what, e) from None

    def copy_block(self, src: int, dst: int) -> None:
        self.send([P.COPY, src, dst])
        self.inner.copy_block(src, dst)

    def shift_keys(self, block_ids: list[int], delta: int) -> None:
        self.send([P.SHIFT, delta, len(block_ids), *block_ids])
        self.inner.shift_keys(block_ids, delta)

    def make_tiers(self, tiers_cfg, fingerprint: str, use_ssd: bool):
        """The engine's tier store: with `use_ssd`, every rank opens its own SSD store (distributed/tiers.py).

        Raises:
            ConfigError: a rank cannot use its SSD cache directory (names the rank; its own output says why).
        """
        from .tiers import LeaderTiers, open_rank_ssd

        if not use_ssd or self.inner.windows is not None:
            # sliding-window models: their window rows are not spilled per rank yet (docs/distributed.md, Limits)
            return LeaderTiers(self, None)
        self.send([P.SSD_OPEN])
        ssd, err = None, None
        try:
            ssd = open_rank_ssd(tiers_cfg, self.inner.pool, fingerprint, self.group, self.split)
        except ConfigError as e:
            err = e
        self.ssd = ssd
        bad = ssd_opened(self.group, ssd is not None)
        if err is not None:
            raise err
        if bad:
            raise ConfigError(f"rank {bad[0]} cannot use its SSD cache directory (its output says why); give "
                              "that machine a writable --ssd-dir, or start every rank with --ssd-cache off")
        return LeaderTiers(self, ssd)

    def rank_stats(self) -> list[dict]:
        """Per rank: its KV heads, pool bytes and blocks, weight bytes and MLX active memory."""
        self.send([P.STATS])
        if self.ssd is not None:
            self.ssd.flush()  # every rank counts its written files (the others flush too)
        return gather_stats(self.group, self.inner, self.ssd)

    def shutdown(self) -> None:
        """Tells the other ranks to end (they exit 0). Safe to call twice or after a failure."""
        if self.closed or self.group.failed is not None:
            return
        self.closed = True
        try:
            self.send([P.CLOSE])
        except Exception:  # noqa: BLE001 -- the job is ending anyway; the failure was reported already
            pass


# Why a session's unsaved turns are lost after a rank died: its K/V heads are split over the ranks.
LOST = ("the distributed job lost a rank, and saving needs every rank's KV heads: its turns since the last save are "
        "lost (restart every rank with mlx.launch)")


def ssd_opened(group: DistGroup, ok: bool) -> list[int]:
    """The ranks that could not open their SSD store (call on every rank after SSD_OPEN)."""
    flags = np.array(group.gather(mx.array([int(ok)], dtype=mx.int32), "opening the SSD tier")).reshape(-1)
    return [r for r, f in enumerate(flags.tolist()) if not f]


def gather_stats(group: DistGroup, runner: ModelRunner, ssd=None) -> list[dict]:
    """Every rank's figures, gathered (call on every rank after a STATS message; `ssd`: this rank's store)."""
    pool = runner.pool
    n_layers = len(runner.plan.paged_slots)  # this rank's paged layers (pipeline: its share of them)
    disk = [len(ssd), ssd.used_bytes, ssd.spills, ssd.promotions] if ssd is not None else [0, 0, 0, 0]
    mine = mx.array([group.rank, n_layers, pool.n_kv_heads, pool.num_blocks, pool.total_bytes,
                     pool.total_bytes // max(1, pool.num_blocks), runner.lm.weight_bytes, mx.get_active_memory(),
                     *disk], dtype=mx.int64)
    rows = group.gather(mine, "stats").tolist()
    keys = ("rank", "n_layers", "n_kv_heads", "blocks_total", "total_size", "bytes_per_block", "weight_bytes", "active_memory",
            "ssd_blocks", "ssd_size", "ssd_spills", "ssd_promotions")
    return [dict(zip(keys, r)) for r in rows]


class ShardedPool:
    """Rank 0's view of the pool for the engine, sessions and stats: rank 0's own arrays, but exports gather every
    rank's KV heads into the normal (single-process) block layout and imports hand each rank its heads."""

    def __init__(self, pool, leader: LeaderRunner):
        self._pool, self._leader = pool, leader

    def __getattr__(self, name):
        return getattr(self._pool, name)

    @property
    def n_kv_heads(self) -> int:
        """KV heads of the whole model (tensor split: each rank holds n_kv_heads / world size of them)."""
        return self._pool.n_kv_heads * (self._leader.group.size if self._leader.split == "tensor" else 1)

    def block_layout(self):
        (ks, kd), (vs, vd) = self._pool.block_layout()
        if self._pool.quant is not None:
            return (ks, kd), (vs, vd)
        full = (self.n_kv_heads, *ks[1:])
        return (full, kd), (full, vd)

    def _float_only(self, what: str) -> None:
        why = self._leader.session_refusal()
        if why is not None:
            from .snapshots import ONE_MACHINE

            raise SessionError(f"{what}: {why}{ONE_MACHINE}")
        if self._leader.group.failed is not None:
            raise SessionError(f"{what}: {LOST}")

    def _collective(self, fn, *args):
        # a rank lost during the export or import itself: the same one-line SessionError as after the loss
        try:
            return fn(*args)
        except DistributedError:
            raise SessionError(LOST) from None

    def export_blocks(self, block_ids: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Blocks' K/V with every rank's heads, per layer [n, n_kv_heads (all), block_size, head_dim]."""
        self._float_only("exporting KV blocks")
        self._collective(self._leader.send, [P.EXPORT, len(block_ids), *block_ids])
        return self._collective(export_gathered, self._leader.group, self._pool, block_ids)

    def import_blocks(self, block_ids: list[int], ks: list[np.ndarray], vs: list[np.ndarray]) -> None:
        """Writes blocks of the single-process layout (all heads) into every rank's pool, each its heads."""
        self._float_only("importing KV blocks")
        code = NP_DTYPES.index(np.dtype(ks[0].dtype).type) if ks else 0
        self._collective(self._leader.send, [P.IMPORT, code, len(block_ids), *block_ids])
        self._collective(import_sharded, self._leader.group, self._pool, block_ids, code, np.stack(ks), np.stack(vs))


def export_gathered(group: DistGroup, pool, block_ids: list[int]):
    """Every rank's exported heads of `block_ids`, concatenated in rank order (rank r holds heads
    [r*h, (r+1)*h), as mlx-lm's `shard_linear` "all-to-sharded" split gives them). Call on every rank."""
    ks, vs = pool.export_blocks(block_ids)
    both = mx.array(np.stack([np.stack(ks), np.stack(vs)]))  # [2, L, n, h, BS, D]
    allr = np.array(group.gather(both, "an export"))  # [R, 2, L, n, h, BS, D]
    R, _, L, n, h, bs, d = allr.shape
    full = allr.transpose(1, 2, 3, 0, 4, 5, 6).reshape(2, L, n, R * h, bs, d)
    return [full[0, i] for i in range(L)], [full[1, i] for i in range(L)]


def import_sharded(group: DistGroup, pool, block_ids: list[int], code: int, k: np.ndarray | None,
                   v: np.ndarray | None) -> None:
    """Broadcasts the blocks' K/V ([L, n, all heads, BS, D] each, rank 0's) and writes this rank's heads."""
    L, n, h = pool.n_layers, len(block_ids), pool.n_kv_heads
    shape = (2, L, n, h * group.size, pool.block_size, pool.head_dim)
    dtype = {np.float16: mx.float16, np.uint16: mx.uint16, np.float32: mx.float32}[NP_DTYPES[code]]
    both = None if k is None else mx.array(np.stack([k, v]))
    both = np.array(group.broadcast(both, shape, dtype, "an import"))
    mine = both[:, :, :, group.rank * h : (group.rank + 1) * h]
    pool.import_blocks(block_ids, [np.ascontiguousarray(mine[0, i]) for i in range(L)],
                       [np.ascontiguousarray(mine[1, i]) for i in range(L)])


def start(cfg):
    """Rank 0's engine inputs: (its shard of the model, the engine config, the `make_runner` for `Engine`).
    The SSD tier, if on, is one store per rank (`LeaderRunner.make_tiers`)."""
    from .group import current_group
    from .load import load_shard

    group = current_group()
    return load_shard(cfg, group), cfg, runner_factory(group, cfg.distributed_split)
