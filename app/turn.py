"""One reply being generated, and what it cost (time to first token, tok/s, prefix-hit tokens)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(slots=True)
class TurnMetrics:
    """What one reply cost. Fields are None when the engine did not say."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    ttft_s: float | None = None
    total_s: float | None = None
    finish_reason: str = "stop"

    @property
    def tok_per_s(self) -> float | None:
        """Decode speed: tokens after the first over the time after the first token."""
        if not self.completion_tokens or self.total_s is None:
            return None
        if self.ttft_s is not None and self.completion_tokens > 1 and self.total_s > self.ttft_s:
            return (self.completion_tokens - 1) / (self.total_s - self.ttft_s)
        return self.completion_tokens / self.total_s if self.total_s > 0 else None

    def summary(self) -> str:
        """One line for under a reply, e.g. `TTFT 0.21 s · 38.0 tok/s · 24 tokens · prefix hit 64/120`."""
        parts = []
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s:.2f} s")
        if self.tok_per_s is not None:
            parts.append(f"{self.tok_per_s:.1f} tok/s")
        if self.completion_tokens is not None:
            parts.append(f"{self.completion_tokens} tokens")
        if self.cached_tokens is not None:
            of = f"/{self.prompt_tokens}" if self.prompt_tokens is not None else ""
            parts.append(f"prefix hit {self.cached_tokens}{of}")
        if self.finish_reason not in ("stop", "length", "cancelled"):
            parts.append(self.finish_reason)
        return " · ".join(parts) or "no metrics"


class Turn:
    """One reply being generated. Iterate (in a worker thread) for text chunks; `cancel()` from any thread.

    After iteration `metrics` holds the usage; `stopped` says whether it was cancelled.
    """

    def __init__(self, start: Callable[[], object], stats: Callable[[], dict] | None, exact: bool):
        self._start = start
        self._stats = stats
        self._exact = exact
        self._cancel = threading.Event()
        self._handle = None
        self.metrics = TurnMetrics()
        self.stopped = False

    def cancel(self) -> None:
        self._cancel.set()
        handle = self._handle
        if handle is not None and hasattr(handle, "cancel"):
            handle.cancel()

    def __iter__(self) -> Iterator[str]:
        before = _hit_tokens(self._stats)
        t0 = time.perf_counter()
        if self._exact:
            yield from self._events(t0)
        else:
            yield from self._chunks(t0)
        m = self.metrics
        if m.cached_tokens is None and before is not None:
            after = _hit_tokens(self._stats)
            if after is not None:
                m.cached_tokens = max(0, after - before)

    def _events(self, t0: float) -> Iterator[str]:
        self._handle = handle = self._start()
        if self._cancel.is_set():
            handle.cancel()
        for ev in handle:
            if ev.kind == "error":
                raise ev.error
            if ev.text:
                yield ev.text
            if ev.kind == "done":
                u = ev.usage or {}
                self.metrics = TurnMetrics(
                    prompt_tokens=u.get("prompt_tokens"), completion_tokens=u.get("completion_tokens"),
                    cached_tokens=u.get("cached_tokens"), ttft_s=u.get("ttft_s"),
                    total_s=u.get("total_s", time.perf_counter() - t0), finish_reason=ev.finish_reason or "stop")
        self.stopped = self._cancel.is_set() or self.metrics.finish_reason == "cancelled"

    def _chunks(self, t0: float) -> Iterator[str]:
        # Only text comes back: time the chunks here (the engine sends about one chunk per token).
        it = self._start()
        n, ttft = 0, None
        try:
            for chunk in it:
                if self._cancel.is_set():
                    break
                if ttft is None:
                    ttft = time.perf_counter() - t0
                n += 1
                yield chunk
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # ZKV's stream cancels the request when closed early
        self.stopped = self._cancel.is_set()
        self.metrics = TurnMetrics(completion_tokens=n, ttft_s=ttft, total_s=time.perf_counter() - t0,
                                   finish_reason="cancelled" if self.stopped else "stop")


def _hit_tokens(stats: Callable[[], dict] | None) -> int | None:
    if stats is None:
        return None
    try:
        value = stats().get("hit_tokens")
    except Exception:  # stats are a nicety for the metrics line; the reply matters more
        return None
    return int(value) if value is not None else None
