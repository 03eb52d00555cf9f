"""The process group and the two collectives the plan needs: broadcast from rank 0 and gather to every rank.

Both are built from mx.distributed's own collectives (no transport of our own): a broadcast is an `all_sum` to
which every rank but 0 contributes zeros; a gather is `all_gather`. Every call is synchronous (evaluated before it
returns) so that collectives happen in the same order on every rank, and any failure of the ring (a rank that died
or cannot be reached) becomes a `DistributedError`. A watchdog ends the process when a collective does not finish
within the timeout (a peer that vanished without closing its sockets would otherwise hang it forever).
"""

from __future__ import annotations

import os
import sys
import threading

import mlx.core as mx
import numpy as np

from ..errors import DistributedError

# int32s of a plan's first message: a decode step of a few sequences with short block tables fits in one.
HEADER_INTS = 128
# Seconds a collective may take before the watchdog ends the process (env ZKV_DIST_TIMEOUT overrides).
DEFAULT_TIMEOUT = 120.0


class DistGroup:
    """The ring group of a launched job, with byte counters (for `bench distributed`).

    Args:
        backend: mx.distributed backend ("ring": TCP over Ethernet/Thunderbolt, also on Linux CPUs).
    Raises:
        DistributedError: not launched by `mlx.launch` (no group of more than one process).
    """

    def __init__(self, backend: str = "ring"):
        try:
            self.group = mx.distributed.init(strict=True, backend=backend)
        except RuntimeError as e:
            raise DistributedError(
                f"distributed=True needs a process started by mlx.launch ({e}); run e.g. "
                "`mlx.launch -n 2 --backend ring -- python script.py` or `mlx.launch --hostfile hosts.json -- "
                "zkv-mlx serve ...`") from None
        self.rank = self.group.rank()
        self.size = self.group.size()
        if self.size < 2:
            raise DistributedError("distributed=True in a job of one process: launch at least 2 ranks with "
                                   "mlx.launch (-n 2 or a host file), or drop distributed=True")
        self.timeout = float(os.environ.get("ZKV_DIST_TIMEOUT", DEFAULT_TIMEOUT))
        self.bytes_sent = 0  # payload bytes of this process's plan collectives (not the model's own)
        self.collectives = 0  # and their number
        self.failed: DistributedError | None = None
        self.failed_during: str | None = None  # what the lost collective was for

    def _run(self, what: str, x: mx.array, watchdog: bool = True) -> mx.array:
        if self.failed is not None:
            raise self.failed
        timer = threading.Timer(self.timeout, _give_up, (self.rank, what, self.timeout))
        timer.daemon = True
        if watchdog:
            timer.start()
        try:
            mx.eval(x)
        except RuntimeError as e:
            raise self.lost(what, e) from None
        finally:
            timer.cancel()
        return x

    def lost(self, what: str, e: Exception) -> DistributedError:
        """Records that a collective failed (a rank is gone) and returns the error every later call raises."""
        self.failed_during = what
        self.failed = DistributedError(
            f"rank {self.rank}: the distributed job lost a rank during {what} ({e}); in-flight requests "
            "are ended. Restart every rank with mlx.launch")
        return self.failed

    def broadcast(self, x: mx.array | None, shape: tuple, dtype: mx.Dtype, what: str = "a plan",
                  watchdog: bool = True) -> mx.array:
        """Rank 0's `x` on every rank (others pass None; `shape`/`dtype` must agree on all ranks).

        watchdog: False for a wait that may last (ranks > 0 waiting for rank 0's next plan while it is idle).
        """
        if self.rank != 0 or x is None:
            x = mx.zeros(shape, dtype=dtype)
        self.bytes_sent += x.nbytes
        self.collectives += 1
        return self._run(what, mx.distributed.all_sum(x, group=self.group, stream=mx.cpu), watchdog)

    def gather(self, x: mx.array, what: str = "a gather", watchdog: bool = True) -> mx.array:
        """Every rank's `x` stacked along a new first axis (rank order), on every rank."""
        self.bytes_sent += x.nbytes
        self.collectives += 1
        out = mx.distributed.all_gather(x[None], group=self.group, stream=mx.cpu)
        return self._run(what, out, watchdog)

    def send_ints(self, values: list[int] | None, what: str = "a plan", watchdog: bool = True) -> list[int]:
        """Broadcasts a list of int32 from rank 0: one fixed-size message [length, first values...] (one round
        trip for a typical step's plan), then the rest, if any, in a second one."""
        head = None
        if values is not None:
            head = mx.array(([len(values)] + values[: HEADER_INTS - 1] + [0] * HEADER_INTS)[:HEADER_INTS],
                            dtype=mx.int32)
        head = self.broadcast(head, (HEADER_INTS,), mx.int32, what, watchdog).tolist()
        n = head[0]
        if n <= HEADER_INTS - 1:
            return head[1 : 1 + n]
        rest = None if values is None else mx.array(values[HEADER_INTS - 1 :], dtype=mx.int32)
        return head[1:] + self.broadcast(rest, (n - HEADER_INTS + 1,), mx.int32, what).tolist()

    def send_bytes(self, data: bytes | None, what: str) -> bytes:
        """Broadcasts a byte string from rank 0 (length header, then uint8 payload)."""
        n = self.broadcast(None if data is None else mx.array([len(data)], dtype=mx.int32), (1,), mx.int32, what)
        n = int(n.item())
        arr = None if data is None else mx.array(np.frombuffer(data, dtype=np.uint8))
        return bytes(np.array(self.broadcast(arr, (n,), mx.uint8, what))) if n else b""


def rank_line(rank: int, error: BaseException) -> str:
    """`error` as one line of rank `rank`'s stderr: "zkv-mlx: rank R: ...", the rank named once."""
    text = " ".join(str(error).split())  # one line, whatever the message held
    return f"zkv-mlx: rank {rank}: {text.removeprefix(f'rank {rank}: ')}"


_GROUP: DistGroup | None = None


def current_group() -> DistGroup:
    """The job's group (created on first use; every later call returns the same one)."""
    global _GROUP
    if _GROUP is None:
        _GROUP = DistGroup()
    return _GROUP


def _give_up(rank: int, what: str, timeout: float) -> None:
    # A collective that never returns cannot be interrupted from Python: end the process with a clear message.
    print(f"zkv-mlx: rank {rank}: no answer from the other ranks within {timeout:.0f} s during {what}; a rank is "
          "down or unreachable. Exiting (restart every rank with mlx.launch; ZKV_DIST_TIMEOUT sets the limit)",
          file=sys.stderr, flush=True)
    os._exit(3)
