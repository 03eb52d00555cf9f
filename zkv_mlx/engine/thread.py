"""The thread that owns the Engine (and so every MLX array) and serves requests submitted from other threads
through a queue."""

from __future__ import annotations

import queue
import threading
import traceback

import mlx.core as mx

from ..config import EngineConfig, PolicyConfig
from ..errors import ZkvError
from ..models.loader import load_model
from .engine import Engine
from ..streams import EventQueue
from .output import Event
from .sequence import SamplingParams, Sequence


class RequestHandle(EventQueue):
    """A submitted request as seen from the caller's thread: iterate for events, cancel to stop."""

    def __init__(self, thread: "EngineThread"):
        super().__init__()
        self._thread = thread
        self.seq: Sequence | None = None

    def cancel(self) -> None:
        """Stops generation (blocks are freed on the engine thread)."""
        if not self.done:
            self._thread._commands.put(("cancel", self))


class EngineThread:
    """Owns the Engine (and so every MLX array) on one thread; other threads submit through `submit`.

    Args:
        cfg: the engine config. The model is loaded on the engine thread; `start()` waits for it and raises
        the load error, if any, in the caller's thread.
    """

    def __init__(self, cfg: EngineConfig, progress=None):
        self.cfg = cfg
        self.engine: Engine | None = None
        self._commands: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._progress = progress
        self._thread = threading.Thread(target=self._run, name="zkv-engine", daemon=True)

    def start(self) -> "EngineThread":
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()  # let it release its MLX streams first, or the process aborts at exit
            raise self._error
        return self

    def submit(self, prompt_ids: list[int], params: SamplingParams, user: str = "local",
               policy: PolicyConfig | None = None) -> RequestHandle:
        """Queues a request from any thread; returns its handle immediately (policy: see Engine.add_request)."""
        handle = RequestHandle(self)
        self._commands.put(("add", (prompt_ids, params, user, handle, policy)))
        return handle

    def call(self, fn, *args):
        """Runs fn(engine, *args) on the engine thread and returns its result (for stats and the like)."""
        box: queue.Queue = queue.Queue()
        self._commands.put(("call", (fn, args, box)))
        ok, value = box.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self._thread.is_alive():
            self._commands.put(("stop", None))
            self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            # MLX needs its per-thread streams released before the thread ends, or the process aborts
            # at exit ("terminate called without an active exception"; ml-explore/mlx#4327).
            mx.synchronize()
            mx.clear_streams()

    def _serve(self) -> None:
        try:
            if self.cfg.distributed:
                from ..distributed.leader import start

                lm, cfg, make_runner = start(self.cfg)
                self.engine = Engine(lm, cfg, make_runner)
            else:
                lm = load_model(self.cfg.model, self.cfg.weights_dtype)
                self.engine = Engine(lm, self.cfg)
            self.engine.preload_prefixes()
        except BaseException as e:  # reported to start()'s caller
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        eng = self.engine
        while True:
            try:
                cmd = self._commands.get(block=not eng.has_work())
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd[0] == "stop":
                    eng.fail_all(ZkvError("the engine was closed"))
                    eng._resolve()
                    eng.close_tiers()
                    getattr(eng.runner, "shutdown", lambda: None)()  # distributed: the other ranks end
                    return
                self._handle(eng, cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if eng.has_work():
                try:
                    eng.step()
                except Exception as e:  # keep serving; the requests in flight get the error
                    if not isinstance(e, ZkvError):  # ours (e.g. a lost rank) carry their own message
                        traceback.print_exc()
                    eng.fail_all(e)

    def _handle(self, eng: Engine, cmd) -> None:
        kind, arg = cmd
        if kind == "add":
            prompt_ids, params, user, handle, policy = arg
            try:
                handle.seq = eng.add_request(prompt_ids, params, user, handle._push, policy)
            except ZkvError as e:
                handle._push(Event("error", error=e, finish_reason="error"))
        elif kind == "cancel":
            if arg.seq is not None:
                eng.cancel(arg.seq)
        elif kind == "call":
            fn, args, box = arg
            try:
                box.put((True, fn(eng, *args)))
            except Exception as e:
                box.put((False, e))
