"""A deterministic stand-in for `zkv_mlx.api.ZKV` with the sessions and prefix-cache API, for tests and UI work.

It speaks the same protocol the TUI's Backend uses (chat, submit + tokenizer.encode_chat, kv_cache_stats, info,
close, create_session/list_sessions/load_session/delete_session/import_session/rename_session, kv_block_map)
with canned replies, a small prefix cache over word "tokens" and JSON session files. `features` switches parts off
to check that the UI degrades gracefully when an engine build lacks them.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from zkv_mlx.errors import SessionError, SessionFormatError
from zkv_mlx.names import check_name
from zkv_mlx.streams import EventQueue, stream_texts

ALL_FEATURES = frozenset({"sessions", "rename", "block_map", "prefix_stats", "usage"})
BLOCK_SIZE = 4
NUM_BLOCKS = 96


@dataclass(slots=True)
class FakeEvent:
    kind: str
    text: str = ""
    finish_reason: str | None = None
    error: Exception | None = None
    usage: dict = field(default_factory=dict)


class FakeTokenizer:
    """One token per word; chat messages are framed by role tokens. Remembers what it rendered, so that a
    submit() of those ids can answer the conversation."""

    def __init__(self):
        self.rendered: dict[tuple, list[dict]] = {}

    def encode(self, text: str) -> list[int]:
        return [zlib.crc32(w.encode()) % 50000 for w in text.split()]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        ids = []
        for m in messages:
            ids += [1, zlib.crc32(m["role"].encode()) % 50000] + self.encode(m["content"]) + [2]
        ids += [1, 3]
        self.rendered[tuple(ids)] = list(messages)
        return ids


def reply_for(messages: list[dict]) -> str:
    """The canned reply: Markdown that quotes the last user message."""
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return f"You said: **{last}**\n\n- paged KV blocks\n- prefix caching\n\nAnything else?"


class FakeHandle(EventQueue):
    """Like the engine's RequestHandle: iterate for events, cancel() from any thread."""

    def __init__(self, owner: "FakeZKV", ids: list[int], text: str, user: str):
        super().__init__()
        self._cancelled = threading.Event()
        threading.Thread(target=owner._generate, args=(self, ids, text, user), daemon=True).start()

    def cancel(self) -> None:
        self._cancelled.set()


class FakeSession:
    """A named conversation whose KV blocks stay 'used' while it lives."""

    def __init__(self, owner: "FakeZKV", name: str, user: str | None, messages=None, created=0.0):
        self._owner = owner
        self.name, self.user = name, user
        self.messages: list[dict] = list(messages or [])
        self.created_at = self.updated_at = created

    def _ids(self) -> list[int]:
        return self._owner.tokenizer.encode_chat(self.messages) if self.messages else []

    def info(self) -> dict:
        n = len(self._ids())
        return {"name": self.name, "user": self.user, "context_length": n,
                "cache_size_bytes": n * self._owner.bytes_per_token, "created_at": self.created_at,
                # Like zkv_mlx.Session.info(): an open session with an empty context reports "none".
                "updated_at": self.updated_at, "tier": "memory" if self.messages else "none"}

    def chat(self, messages, *, stream: bool = False, **sampling):
        self.messages += messages
        full = list(self.messages)

        def gen():
            reply = []
            for chunk in self._owner.chat(full, stream=True, user=self.user, **sampling):
                reply.append(chunk)
                yield chunk
            self.messages.append({"role": "assistant", "content": "".join(reply)})
            self.updated_at += 1

        return gen() if stream else "".join(gen())

    def clear(self) -> None:
        self.messages = []

    def save(self, path=None) -> None:
        self._owner.saves += 1

    def export(self, path) -> None:
        data = {"format": "fake-session-1", "name": self.name, "user": self.user, "messages": self.messages}
        from zkv_mlx.storage.atomic import atomic_write  # here: importing zkv_mlx.storage loads MLX

        with atomic_write(path) as f:
            f.write(json.dumps(data).encode())


class FakeZKV:
    """A fake model. Args: reply_delay (seconds between chunks), load_delay, features (subset of ALL_FEATURES),
    sessions (names of sessions that already exist), fail (an exception chat/submit should raise),
    hold (a threading.Event: replies pause after their first chunk until it is set or they are cancelled)."""

    bytes_per_token = 2048

    def __init__(self, *, reply_delay: float = 0.0, load_delay: float = 0.0, features=ALL_FEATURES,
                 sessions: tuple[str, ...] = (), fail: Exception | None = None,
                 hold: threading.Event | None = None):
        time.sleep(load_delay)
        self.features = frozenset(features)
        self.reply_delay = reply_delay
        self.fail = fail
        self.hold = hold
        self.tokenizer = FakeTokenizer()
        self.closed = False
        self.saves = 0
        self._lock = threading.Lock()
        self._cached: dict[tuple, int] = {}  # (user, block prefix) -> block id
        self._stats = dict(prompt_cache_hits=0, prompt_cache_misses=0, hit_tokens=0, miss_tokens=0, evictions=0)
        self._sessions: dict[str, FakeSession] = {}
        for i, name in enumerate(sessions):
            self._sessions[name] = FakeSession(self, name, None, [
                {"role": "user", "content": f"Hello from {name}"},
                {"role": "assistant", "content": f"Hi! This is the **{name}** session."}], created=float(i))
        if "sessions" not in self.features:
            for n in ("create_session", "list_sessions", "load_session", "delete_session", "import_session",
                      "close_session"):
                setattr(self, n, None)
        if "rename" not in self.features or "sessions" not in self.features:
            self.rename_session = None
        if "block_map" not in self.features:
            self.kv_block_map = None
        if "usage" not in self.features:
            self.submit = None

    @property
    def info(self) -> dict:
        return {"model": "fake-model", "path": "(fake)", "family": "llama", "fingerprint": "0" * 32,
                "weights": "float32", "max_context": 2048, "kv_dtype": "float16", "kv_blocks": NUM_BLOCKS,
                "block_size": BLOCK_SIZE}

    # -- generation -----------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], user: str | None = None, **sampling):
        if self.fail is not None:
            raise self.fail
        reply = reply_for(self.tokenizer.rendered.get(tuple(prompt_ids), []))
        return FakeHandle(self, list(prompt_ids), reply, user or "local")

    def chat(self, messages, *, stream: bool = False, user: str | None = None, **sampling):
        if self.fail is not None:
            raise self.fail
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        handle = FakeHandle(self, self.tokenizer.encode_chat(messages), reply_for(messages), user or "local")

        return stream_texts(handle) if stream else "".join(stream_texts(handle))

    def _generate(self, handle: FakeHandle, ids: list[int], text: str, user: str) -> None:
        cached = self._lookup(ids, user)
        words = (text or "OK, noted.").split(" ")
        n = 0
        for i, w in enumerate(words):
            while i == 1 and self.hold is not None and not self.hold.is_set() and not handle._cancelled.is_set():
                time.sleep(0.01)
            if handle._cancelled.is_set():
                break
            time.sleep(self.reply_delay)
            handle._events.put(FakeEvent("token", text=w if i == 0 else " " + w))
            n += 1
        reason = "cancelled" if handle._cancelled.is_set() else "stop"
        # Fixed timings so screenshots are reproducible: 50 ms to the first token, then 100 tok/s.
        usage = {"prompt_tokens": len(ids), "completion_tokens": n, "ttft_s": 0.05,
                 "total_s": 0.05 + max(0, n - 1) * 0.01}
        if "prefix_stats" in self.features:
            usage["cached_tokens"] = cached
        handle._events.put(FakeEvent("done", finish_reason=reason, usage=usage))

    def _lookup(self, ids: list[int], user: str) -> int:
        """Counts and registers full prompt blocks (never the last token), like a chained-hash prefix cache."""
        with self._lock:
            full = (len(ids) - 1) // BLOCK_SIZE
            hit = 0
            for b in range(full):
                key = (user, tuple(ids[: (b + 1) * BLOCK_SIZE]))
                if key in self._cached and hit == b:
                    hit += 1
                elif key not in self._cached:
                    if len(self._cached) >= NUM_BLOCKS // 2:
                        self._cached.pop(next(iter(self._cached)))
                        self._stats["evictions"] += 1
                    self._cached[key] = len(self._cached)
            s = self._stats
            s["prompt_cache_hits" if hit else "prompt_cache_misses"] += 1
            s["hit_tokens"] += hit * BLOCK_SIZE
            s["miss_tokens"] += len(ids) - hit * BLOCK_SIZE
            return hit * BLOCK_SIZE

    # -- cache ----------------------------------------------------------------------------------------
    def kv_cache_stats(self) -> dict:
        with self._lock:
            used = sum(-(-s.info()["context_length"] // BLOCK_SIZE) for s in self._sessions.values())
            used = min(used, NUM_BLOCKS // 2)
            cached = len(self._cached)
            per_block = BLOCK_SIZE * self.bytes_per_token
            out = {"blocks_total": NUM_BLOCKS, "blocks_used": used, "blocks_free": NUM_BLOCKS - used,
                   "blocks_cached": cached, "block_size": BLOCK_SIZE, "total_size": NUM_BLOCKS * per_block,
                   "used_size": used * per_block, "cached_size": cached * per_block, "running": 0, "waiting": 0}
            if "prefix_stats" in self.features:
                s = self._stats
                lookups = s["hit_tokens"] + s["miss_tokens"]
                out.update(s, hit_rate=(s["hit_tokens"] / lookups) if lookups else 0.0, fragmentation=0.0,
                           per_user={}, ssd_enabled=True, ssd_blocks=3, ssd_size=3 * per_block,
                           ssd_spills=3, ssd_promotions=0,
                           ssd_capacity=32 * per_block)
            return out

    def kv_block_map(self) -> list[str]:
        st = self.kv_cache_stats()
        used, cached = st["blocks_used"], st["blocks_cached"]
        # Like the engine: open sessions' blocks are pinned, cached prefixes follow; SSD blocks are only counted.
        states = ["pinned"] * used + ["shared"] * min(1, cached) + ["cached"] * max(0, cached - 1)
        return (states + ["free"] * NUM_BLOCKS)[:NUM_BLOCKS]

    # -- sessions (the shape of zkv_mlx.api: user= everywhere, SessionError for taken names) ------------
    def create_session(self, name: str | None = None, user: str | None = None) -> FakeSession:
        name = check_name(name or f"session-{len(self._sessions) + 1}")
        if name in self._sessions:
            raise SessionError(f"session {name!r} already exists; pick another name or load it")
        self._sessions[name] = FakeSession(self, name, user, created=float(len(self._sessions)))
        return self._sessions[name]

    def list_sessions(self, user: str | None = None) -> list[dict]:
        return [s.info() for s in self._sessions.values() if user is None or s.user in (None, user)]

    def load_session(self, path_or_name: str, user: str | None = None) -> FakeSession:
        if path_or_name in self._sessions:
            return self._sessions[path_or_name]
        return self.import_session(path_or_name, user=user)

    def close_session(self, name: str, user: str | None = None) -> None:
        self._sessions[name].save()

    def delete_session(self, name: str, user: str | None = None) -> None:
        if self._sessions.pop(name, None) is None:
            raise SessionError(f"no session named {name!r}")

    def rename_session(self, old: str, new: str) -> None:
        if check_name(new) in self._sessions:
            raise SessionError(f"session {new!r} already exists")
        session = self._sessions.pop(old)
        session.name = new
        self._sessions[new] = session

    def import_session(self, path, name: str | None = None, user: str | None = None) -> FakeSession:
        try:
            data = json.loads(Path(path).read_text())
            assert data["format"] == "fake-session-1"
        except Exception as e:
            raise SessionFormatError(f"{path}: not a session file ({e})") from None
        name = check_name(name or data["name"])
        if name in self._sessions:
            raise SessionError(f"session {name!r} already exists; import it under another name, e.g. {name + '-2'!r}")
        self._sessions[name] = FakeSession(self, name, data["user"], data["messages"])
        return self._sessions[name]

    def close(self) -> None:
        self.closed = True
