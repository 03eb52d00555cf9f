"""From the engine's blocking RequestHandle to the event loop, and the bound on requests in flight."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass


@dataclass(slots=True)
class Failure:
    """An error event made here (the handle itself raised), shaped like the engine's events."""

    error: Exception
    kind: str = "error"
    text: str = ""
    finish_reason: str = "error"


class Slots:
    """Counts requests in flight (waiting or generating), from any thread."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self.in_use >= self.limit:
                return False
            self.in_use += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.in_use -= 1


class EventStream:
    """Iterates a RequestHandle on its own thread, so waiting for tokens never blocks the event loop.

    Args:
        handle: from `ZKV.submit`; its events are handed over in order.
        on_end: called (on the stream's thread) once the handle is done, after its last event.
    """

    def __init__(self, handle, on_end=None):
        self.handle = handle
        self.done = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._on_end = on_end
        threading.Thread(target=self._pump, name="zkv-server-stream", daemon=True).start()

    def _pump(self) -> None:
        try:
            for ev in self.handle:
                self._hand_over(self._queue.put_nowait, ev)
        except Exception as e:  # the handle itself failed: the request ends with that error
            self._hand_over(self._queue.put_nowait, Failure(e))
        finally:
            if self._on_end is not None:
                self._on_end()

    def _hand_over(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed (server shutting down): nobody is listening any more
            pass

    async def next(self):
        """The next event; after "done" or "error" there are none."""
        ev = await self._queue.get()
        if ev.kind in ("done", "error"):
            self.done = True
        return ev

    def cancel(self) -> None:
        """Stops generation (its blocks are freed on the engine thread); the stream then ends with "done"."""
        if not self.done:
            self.handle.cancel()
