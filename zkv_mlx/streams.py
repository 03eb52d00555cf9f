"""What a request's events look like from the caller's thread, shared by the engine's handles and the TUI's fake
(no MLX here: a face may import it without loading the engine)."""

from __future__ import annotations

import queue
from collections.abc import Iterator


class EventQueue:
    """One request's events, put by the engine thread and read by the caller's: iterate until "done"/"error"."""

    def __init__(self):
        self._events: queue.Queue = queue.Queue()
        self.done = False

    def _push(self, ev) -> None:
        self._events.put(ev)

    def __iter__(self):
        while not self.done:
            ev = self._events.get()
            if ev.kind in ("done", "error"):
                self.done = True
            yield ev

    def cancel(self) -> None:
        raise NotImplementedError


def stream_texts(handle: EventQueue) -> Iterator[str]:
    """The text pieces of a request's events; raises its error; cancels it when the caller stops reading early."""
    try:
        for ev in handle:
            if ev.kind == "error":
                raise ev.error
            if ev.text:
                yield ev.text
    finally:
        if not handle.done:  # the caller stopped iterating: stop generating
            handle.cancel()
