"""The one place the TUI talks to an engine: a thin adapter over the public `zkv_mlx.api.ZKV` protocol.

Anything with the same methods works (tests use `zkv_mlx.app.fake.FakeZKV`). Parts of the API that a build does
not have yet (sessions, block map, rename, prefix-cache figures) are detected once and reported as capabilities, so
the UI can hide what is missing instead of crashing.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .turn import Turn

SESSION_METHODS = ("create_session", "list_sessions", "delete_session", "import_session", "load_session")
BLOCK_STATES = ("free", "used", "shared", "cached", "pinned", "ssd")


@dataclass(slots=True)
class Capabilities:
    """Which optional parts of the API the loaded model offers."""

    sessions: bool = False
    rename: bool = False
    block_map: bool = False
    usage: bool = False  # submit() + tokenizer.encode_chat(): exact per-turn usage from the engine


@dataclass(slots=True)
class SessionRow:
    """One line of the sessions sidebar (from `session.info()` or a `list_sessions()` item)."""

    name: str
    context_length: int | None = None
    cache_size_bytes: int | None = None
    tier: str | None = None
    updated_at: float | str | None = None

    @classmethod
    def from_any(cls, item) -> "SessionRow":
        if isinstance(item, str):
            return cls(name=item)
        info = item.info() if hasattr(item, "info") and callable(item.info) else item
        if not isinstance(info, dict):
            return cls(name=str(getattr(item, "name", item)))
        return cls(name=str(info.get("name")), context_length=info.get("context_length"),
                   cache_size_bytes=info.get("cache_size_bytes"), tier=info.get("tier"),
                   updated_at=info.get("updated_at"))


@dataclass(slots=True)
class CacheStats:
    """kv_cache_stats() in the shape the cache panel draws; missing figures are None."""

    raw: dict = field(default_factory=dict)
    block_map: list[str] | None = None  # per-block states; None when the engine has no kv_block_map()

    def get(self, key: str):
        return self.raw.get(key)

    def states(self) -> tuple[list[str], bool]:
        """Per-block states and whether they are exact (from kv_block_map) or estimated from the counts."""
        if self.block_map is not None:
            return list(self.block_map), True
        total = int(self.raw.get("blocks_total") or 0)
        used = min(total, int(self.raw.get("blocks_used") or 0))
        # Cached blocks sit in the free queue (unreferenced but reusable), so they count among the free ones.
        cached = min(total - used, int(self.raw.get("blocks_cached") or 0))
        return ["used"] * used + ["cached"] * cached + ["free"] * (total - used - cached), False


def _accepts(fn, param: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return param in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def describe(error: BaseException) -> str:
    """An error as one line for a notification: typed zkv errors by their message, others with their type."""
    from zkv_mlx.errors import ZkvError

    return str(error) if isinstance(error, ZkvError) else f"{type(error).__name__}: {error}"


class BackendClosed(RuntimeError):
    """The engine was closed (the app is quitting)."""


def _guarded(method):
    """Runs a Backend method under its lock, and not at all once the backend is closed."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return self.call(method, self, *args, **kwargs)

    return wrapper


class Backend:
    """Wraps a loaded model (ZKV or anything with its methods) for the TUI.

    Args:
        model: the loaded model.
        user: the user id every request and session is made for (isolation).
        sampling: sampling options passed with every turn (max_tokens, temperature, ...).
    """

    def __init__(self, model, user: str | None = None, sampling: dict | None = None):
        self.model = model
        self.user = user
        self.sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
        self.session = None  # the open Session, or None for an in-memory conversation
        self.session_name: str | None = None
        self._sessions: dict[str, object] = {}
        tok = getattr(model, "tokenizer", None)
        self.caps = Capabilities(
            sessions=all(callable(getattr(model, n, None)) for n in SESSION_METHODS),
            rename=callable(getattr(model, "rename_session", None)),
            block_map=callable(getattr(model, "kv_block_map", None)),
            usage=callable(getattr(model, "submit", None)) and callable(getattr(tok, "encode_chat", None)),
        )
        self._closed = False
        # Held around every engine call: once close() has stopped the engine, a late call would wait forever.
        self._lock = threading.RLock()

    def call(self, fn: Callable, *args, **kwargs):
        """Runs fn(*args, **kwargs) unless the backend is closed (then raises BackendClosed)."""
        with self._lock:
            if self._closed:
                raise BackendClosed("the engine was closed")
            return fn(*args, **kwargs)

    @property
    def info(self) -> dict:
        try:
            return dict(self.model.info)
        except Exception:
            return {}

    # -- chatting -------------------------------------------------------------------------------------
    def turn(self, messages: list[dict], new_messages: list[dict]) -> Turn:
        """Starts a reply. `messages` is the whole conversation (used without a session), `new_messages` the part
        the open session has not seen yet."""
        user, sampling = self.user, self.sampling
        m = self.model
        if self.session is not None:
            session = self.session
            return Turn(lambda: self.call(lambda: session.chat(new_messages, stream=True, **sampling)),
                        self._raw_stats, exact=False)
        if self.caps.usage:
            ids = m.tokenizer.encode_chat(messages)
            return Turn(lambda: self.call(lambda: m.submit(ids, user=user, **sampling)), self._raw_stats, exact=True)
        return Turn(lambda: self.call(lambda: m.chat(messages, stream=True, user=user, **sampling)),
                    self._raw_stats, exact=False)

    # -- statistics -----------------------------------------------------------------------------------
    def _raw_stats(self) -> dict:
        return dict(self.call(self.model.kv_cache_stats))

    def stats(self) -> CacheStats:
        """KV cache statistics plus the block map when the engine has one."""
        raw = self._raw_stats()
        bmap = None
        if self.caps.block_map:
            bmap = [s if s in BLOCK_STATES else "used" for s in self.call(self.model.kv_block_map)]
        return CacheStats(raw=raw, block_map=bmap)

    # -- sessions -------------------------------------------------------------------------------------
    def _api(self, method: str, *args, **kwargs):
        """Calls a sessions API method, passing user= when the method takes it."""
        fn = getattr(self.model, method)
        if self.user is not None and _accepts(fn, "user"):
            kwargs["user"] = self.user
        return fn(*args, **kwargs)

    @_guarded
    def list_sessions(self) -> list[SessionRow]:
        if not self.caps.sessions:
            return []
        rows = [SessionRow.from_any(item) for item in self._api("list_sessions")]
        return sorted(rows, key=lambda r: r.name)

    @_guarded
    def new_session(self, name: str | None = None):
        """Creates a session and makes it the open one."""
        self._leave()
        return self._open(self.model.create_session(name=name or None, user=self.user))

    @_guarded
    def switch(self, name: str | None):
        """Opens the named session (None: back to a fresh in-memory conversation)."""
        self._leave()
        if name is None:
            return None
        session = self._sessions.get(name)
        if session is None:
            session = self._api("load_session", name)
        return self._open(session)

    def _leave(self) -> None:
        # Closing a session saves it and lets its blocks go (pinned blocks are never evicted); switching
        # back restores it from its file. Engines without close_session just save it.
        if self.session is None:
            return
        name, self.session, self.session_name = self.session_name, None, None
        if callable(getattr(self.model, "close_session", None)):
            self._sessions.pop(name, None)
            self._api("close_session", name)
        else:
            save = getattr(self._sessions.get(name), "save", None)
            if callable(save):
                save()

    def _open(self, session):
        name = SessionRow.from_any(session).name
        self._sessions[name] = session
        self.session, self.session_name = session, name
        return session

    def session_messages(self, session=None) -> list[dict] | None:
        """The conversation stored in a session, when the API exposes it (`session.messages`)."""
        session = session if session is not None else self.session
        msgs = getattr(session, "messages", None)
        if callable(msgs):
            msgs = msgs()
        if not isinstance(msgs, list):
            return None
        return [m for m in msgs if isinstance(m, dict) and "role" in m and "content" in m]

    @_guarded
    def delete_session(self, name: str) -> None:
        self._api("delete_session", name)
        self._sessions.pop(name, None)
        if self.session_name == name:
            self.session, self.session_name = None, None

    @_guarded
    def rename_session(self, old: str, new: str) -> None:
        self.model.rename_session(old, new)
        session = self._sessions.pop(old, None)
        if session is not None:
            self._sessions[new] = session
        if self.session_name == old:
            self.session_name = new

    @_guarded
    def export_session(self, name: str, path: str) -> None:
        session = self._sessions.get(name)
        if session is None:  # a saved session that is not open: open it just to export it
            session = self._api("load_session", name)
            self._sessions[SessionRow.from_any(session).name] = session
        session.export(path)

    @property
    def import_takes_name(self) -> bool:
        """Whether import_session(path, name=...) can import under another name (when the file's is taken)."""
        return self.caps.sessions and _accepts(self.model.import_session, "name")

    @_guarded
    def import_session(self, path: str, name: str | None = None) -> str:
        """Imports a session file (as `name`, when given); returns the imported session's name."""
        result = self._api("import_session", path, **({"name": name} if name else {}))
        if isinstance(result, str):
            return result
        row = SessionRow.from_any(result)
        self._sessions[row.name] = result
        return row.name

    @_guarded
    def clear_session(self) -> None:
        clear = getattr(self.session, "clear", None)
        if callable(clear):
            clear()

    def close(self) -> None:
        """Saves the open session and stops the engine (idempotent)."""
        with self._lock:
            if self._closed:
                return
            try:
                save = getattr(self.session, "save", None)
                if callable(save):
                    save()
            finally:
                self._closed = True
                self.model.close()
