"""Named, persistent conversations (issue: sessions). A Session keeps its conversation's K/V resident (pinned
blocks), so each turn computes only its new tokens; it saves to and restores from session files."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import numpy as np

from . import paths
from .errors import SessionError
from .names import is_valid_name
from .models.messages import normalize_messages
from .storage import session_file
from .timestamps import epoch_or_none, iso_utc


def user_dir(user: str) -> Path:
    """Per-user directory for session files (names that are not plain become a hash: no path tricks)."""
    # the session-name rule (fullmatch, not `$`: "alice\n" must not become a directory name of its own), 64 chars
    # (a plain id shaped like a hashed directory is hashed too, so no id can open another id's directory)
    plain = len(user) <= 64 and is_valid_name(user) and not re.fullmatch(r"u-[0-9a-f]{16}", user)
    safe = user if plain else "u-" + hashlib.sha256(
        user.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return paths.data_dir() / "sessions" / safe


def session_path(user: str, name: str) -> Path:
    return user_dir(user) / (session_file.check_name(name) + session_file.SUFFIX)


class Session:
    """A conversation bound to a model. Create with `ZKV.create_session`, not directly."""

    def __init__(self, model, name: str, user: str, messages=None, token_ids=None, created_at=None,
                 updated_at=None):
        self._model = model
        self.name = session_file.check_name(name)
        self.user = user
        self.messages: list[dict] = list(messages or [])
        self.token_ids: list[int] = list(token_ids or [])  # conversation tokens whose K/V are computed
        self.created_at = epoch_or_none(created_at) or time.time()  # a hand-edited "yesterday" is not kept
        self.updated_at = epoch_or_none(updated_at) or self.created_at
        self._dirty = True

    # -- conversation -----------------------------------------------------------------------------------
    def chat(self, messages, *, stream: bool = False, allow_control_tokens: bool = False, **sampling):
        """Adds messages (a string = one user message) and generates the assistant's reply.

        Only the tokens after the cached conversation are computed. Args/returns/errors as `ZKV.chat`;
        `allow_control_tokens` applies to the whole conversation rendered for this turn.
        """
        new = self.messages + normalize_messages(messages)
        ids = self._model._chat_ids(new, allow_control_tokens)
        handle = self._model.submit(ids, user=self.user, **sampling)
        gen = self._turn(handle, new, ids)
        return gen if stream else "".join(gen)

    def _turn(self, handle, new_messages, ids):
        reply_ids, chunks = [], []
        failed = False
        try:
            for ev in handle:
                if ev.kind == "error":
                    failed = True
                    raise ev.error
                if ev.token_id is not None:
                    reply_ids.append(ev.token_id)
                if ev.text:
                    chunks.append(ev.text)
                    yield ev.text
        finally:
            if not handle.done:  # the caller stopped early (e.g. Esc in the TUI): stop generating
                handle.cancel()
            if not failed:  # a finished or stopped turn is part of the conversation, partial reply included
                self.messages = new_messages + [{"role": "assistant", "content": "".join(chunks)}]
                self.token_ids = ids + reply_ids
                self.updated_at = time.time()
                self._dirty = True
                self._repin()

    @property
    def _key(self):
        return (self.user, self.name)

    def _repin(self) -> None:
        key, ids = self._key, self.token_ids
        self._model._thread.call(lambda e: e.set_pins(key, e.full_blocks(self.user, ids)))

    @property
    def _pinned(self) -> list[int]:
        key, t = self._key, self._model._thread
        if not t._thread.is_alive():  # after model.close(): no thread to ask, and no race either
            return list(t.engine.session_pins.get(key, []))
        return t.call(lambda e: list(e.session_pins.get(key, [])))

    def release(self) -> None:
        """Lets the session's blocks be evicted (they stay cached, and spill to SSD when reused)."""
        key = self._key
        self._model._thread.call(lambda e: e.drop_pins(key))

    def clear(self) -> None:
        """Forgets the conversation (messages and cached tokens)."""
        self.release()
        self.messages, self.token_ids = [], []
        self.updated_at = time.time()
        self._dirty = True

    def info(self) -> dict:
        """Returns {name, user, context_length, cache_size_bytes, created_at, updated_at, tier, messages}.

        `created_at` / `updated_at` are ISO-8601 UTC strings such as "2024-01-15T10:30:00Z" (the attributes
        `Session.created_at` / `.updated_at` stay Unix times).
        """
        facts, pinned = self._model.facts, self._pinned
        return {
            "name": self.name,
            "user": self.user,
            "context_length": len(self.token_ids),
            "cache_size_bytes": len(pinned) * facts.bytes_per_block,
            "created_at": iso_utc(self.created_at),
            "updated_at": iso_utc(self.updated_at),
            "tier": "memory" if pinned else ("ssd" if facts.has_ssd and self.token_ids
                                                   else "disk" if self.path.exists() else "none"),
            "messages": len(self.messages),
        }

    # -- files ----------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """Where `save()` writes: the user's directory under the data dir."""
        return session_path(self.user, self.name)

    def save(self, path: str | Path | None = None) -> Path:
        """Writes the session (K/V of its full blocks + tokens + messages) atomically.

        Args:
            path: None for the session's own file in the data dir (`self.path`, which `load_session(name)` and
                `close()` use); a file path (written as given, e.g. "alice_session.zkvs", for
                `load_session(path)` or `import_session(path)`); or an existing directory (written as
                `<dir>/<name>.zkvs`).
        Returns:
            The path written.
        Raises:
            SessionError: the file cannot be written (the message names it; an older file stays intact).
        """
        if path is not None and not str(path):
            raise SessionError("save(path): the path is empty; pass a file path, a directory, or nothing for the "
                               "session's own file in the data dir")
        target = self.path if path is None else Path(path)
        if path is not None and target.is_dir():
            target = target / (self.name + session_file.SUFFIX)
        eng = self._model._thread
        pinned = eng.call(lambda e: e.full_blocks(self.user, self.token_ids))
        f = self._model.facts
        bs = f.block_size
        need = len(self.token_ids) // bs
        if len(pinned) < need:
            # Some blocks were evicted (and not on SSD): recompute the conversation once to bring them back.
            for _ in self._model.submit(list(self.token_ids), user=self.user, max_tokens=1, temperature=0.0):
                pass
            pinned = eng.call(lambda e: e.full_blocks(self.user, self.token_ids))
        if len(pinned) < need:
            # Never write a file that silently lacks K/V: a restore would then compute from missing blocks.
            raise SessionError(
                f"cannot save session {self.name!r}: its {len(self.token_ids)} tokens need {need} KV blocks but only "
                f"{len(pinned)} could be recovered; the previous file (if any) is kept. Free KV memory (close other "
                "sessions or raise --kv-cache-memory) and save again")
        ks, vs = eng.call(lambda e: e.export_kv(pinned))
        meta = {
            "name": self.name, "user": self.user, "model_fingerprint": f.fingerprint, "model_name": f.model_name,
            "kv_format": f.kv_format, "dtype": ks[0].dtype.name if ks else "float32",
            "block_shape": list(ks[0].shape[1:]) if ks else [1],
            "v_block_shape": list(vs[0].shape[1:]) if vs else [1],
            "n_layers": f.n_layers, "n_kv_heads": f.n_kv_heads,
            "block_size": bs, "head_dim": f.head_dim, "n_blocks": len(pinned),
            "token_ids": self.token_ids, "messages": self.messages,
            "created_at": self.created_at, "updated_at": self.updated_at,
        }
        data = session_file.SessionData(meta=meta, k=ks, v=vs)
        if f.has_state:
            # the state layers after the last stored block: a restore resumes there, later tokens recompute
            state = eng.call(lambda e: e.export_state(self.user, self.token_ids, len(pinned)))
            if state is None:
                raise SessionError(f"cannot save session {self.name!r}: the state of its layers at token "
                                   f"{len(pinned) * bs} is no longer cached; send one more message, then save")
            data.state = state[0]
            meta["state"] = {"blocks": len(pinned), "dtypes": state[1],
                             "shapes": [[None if a is None else list(a.shape) for a in arrs] for arrs in state[0]]}
        sec = f.sink_section_bytes
        if sec and ks and ks[0].dtype == np.uint8:
            # Sink keys exist only in a sequence's first block: store those sections once, not per block.
            flags = np.ascontiguousarray(ks[0][:, -sec:-sec + 4]).view(np.uint32)[:, 0]
            first = [int(i) for i in np.nonzero(flags)[0]]
            data.sinks = [np.ascontiguousarray(k[first, -sec:]) for k in ks]
            data.k = [np.ascontiguousarray(k[:, :-sec]) for k in ks]
            meta["block_shape"] = list(data.k[0].shape[1:])
            meta["sink_section"] = {"bytes": sec, "blocks": first}
        session_file.write(target, data)
        if path is None:
            self._dirty = False
        return target

    def export(self, path: str | Path) -> Path:
        """Writes a portable session file to `path` (same format as `save`)."""
        return self.save(path)

    def __repr__(self) -> str:
        return f"Session(name={self.name!r}, user={self.user!r}, tokens={len(self.token_ids)})"
