"""Messages the engine workers post to the UI (they run in threads and never touch widgets themselves)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from .backend import Backend, CacheStats, SessionRow
from .turn import TurnMetrics


@dataclass
class ModelLoaded(Message):
    """The model is ready."""

    backend: Backend


@dataclass
class ModelFailed(Message):
    """Loading the model failed; `error` is the message to show."""

    error: str


@dataclass
class ReplyChunk(Message):
    """A piece of the reply being streamed."""

    text: str


@dataclass
class TurnDone(Message):
    """The reply ended (normally or stopped with Esc)."""

    metrics: TurnMetrics
    stopped: bool


@dataclass
class TurnFailed(Message):
    """The engine raised while replying."""

    error: str


@dataclass
class StatsUpdated(Message):
    """Fresh KV cache statistics."""

    stats: CacheStats


@dataclass
class SessionsUpdated(Message):
    """The list of saved sessions and which one is open (None: an unsaved conversation)."""

    rows: list[SessionRow]
    current: str | None


@dataclass
class SessionOpened(Message):
    """A session (None: the unsaved chat) became the open one; `messages` is its stored conversation when the
    API exposes it, else None."""

    name: str | None
    messages: list[dict] | None


@dataclass
class SessionAction(Message):
    """A sidebar action the user asked for: "switch", "new", "rename", "delete", "export" or "import"."""

    action: str
    name: str | None = None
