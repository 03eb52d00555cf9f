"""The public Python API: `from zkv_mlx import ZKV`.

    model = ZKV()                                   # the bundled SmolLM2-135M-Instruct
    print(model.chat("What is the capital of France?", temperature=0))
    for chunk in model.chat([{"role": "user", "content": "Hi"}], stream=True):
        print(chunk, end="")
"""

from __future__ import annotations

import atexit
import itertools
import sys
import time
import weakref
from pathlib import Path
from collections.abc import Iterator

from .config import EngineConfig, PolicyConfig, check_policy, load_toml, make_config
from .engine import EngineThread, SamplingParams
from .streams import EventQueue, stream_texts  # noqa: F401  (public: what handles and fakes share)
from .engine_facts import EngineFacts, read_facts
from .models.messages import normalize_messages  # noqa: F401  (public: the faces' one message normalisation)
from .errors import ConfigError, SessionError, SessionFormatError
from . import paths
from .saved_sessions import delete_file, open_same_conversation, saved_sessions
from .session import Session, session_path
from .storage import session_file
from .names import NAME_RULE
from .storage.session_file import check_name
from .timestamps import iso_utc
from .api_args import is_file, sampling_params


class ZKV:
    """A loaded model with a paged KV cache, served by one engine thread.

    Args:
        model: None for the bundled default, a .gguf file, or an mlx-lm model directory / repo id.
        config: path of a TOML config file (default: zkv-mlx.toml in the config dir, if present).
        **kwargs: engine settings, e.g. max_context=4096, kv_cache_memory="2GB", block_size=16, max_num_seqs=8.
    """

    def __init__(self, model: str | None = None, *, config: str | None = None, **kwargs):
        toml = load_toml(config) if config else (load_toml(paths.config_file()) if paths.config_file().is_file() else None)
        if model is not None:
            kwargs["model"] = str(model)
        kwargs.pop("paged_attention", None)  # paging is always on; accepted for zKV compatibility
        self.config: EngineConfig = make_config(toml, **kwargs)
        if self.config.distributed:
            from .distributed import serve_if_worker

            serve_if_worker(self.config)  # ranks > 0 serve rank 0's plans here and exit when it closes
        self._sessions: dict[tuple[str, str], Session] = {}
        self._thread = EngineThread(self.config).start()
        _live.add(self)
        self.facts: EngineFacts = self._thread.call(read_facts)
        self.tokenizer = self.facts.tokenizer
        # distributed runs that cannot save sessions refuse them up front (distributed/leader.py)
        self._session_refusal: str | None = self._thread.call(
            lambda eng: getattr(eng.runner, "session_refusal", lambda: None)())

    def _check_sessions(self) -> None:
        if self._session_refusal is not None:
            from .distributed.snapshots import ONE_MACHINE

            raise SessionError(self._session_refusal + ONE_MACHINE)

    @property
    def engine(self):
        """The Engine, for tests and debugging only: it belongs to the engine thread, so read it through
        `self._thread.call(fn)`; the API itself uses `self.facts` and `call`."""
        return self._thread.engine

    # -- generation -----------------------------------------------------------------------------------
    def generate(self, prompt: str | list[int], *, stream: bool = False, user: str | None = None, **sampling):
        """Continues raw text (no chat template). The prompt is the caller's own: control markers in it (e.g.
        ``<|im_start|>``) become control tokens, so never paste someone else's text into it; use `chat`.

        Args:
            prompt: text, or token ids.
            stream: return an iterator of text chunks instead of the full text.
            user: who asks (isolation; default "local").
            **sampling: max_tokens=256, temperature=0.7, top_p, top_k, min_p, repetition_penalty, seed, stop;
                and this request's long-context policy: kv_policy="full"|"window"|"h2o", budget=TOKENS,
                sinks=N, h2o_recent=TOKENS (defaults: the model's config).
        Returns:
            The generated text, or an iterator of text chunks when stream=True.
        """
        ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        return self._run(ids, stream, user, sampling)

    def chat(self, messages, *, stream: bool = False, user: str | None = None, allow_control_tokens: bool = False,
             **sampling):
        """Replies to a conversation rendered with the model's chat template.

        Message content is plain text: control markers typed into it (e.g. ``<|im_end|>``) are encoded as
        ordinary text, so a message cannot end its turn or forge a system/assistant turn.

        Args:
            messages: a string (one user message) or a list of {"role", "content"} dicts; content is a string,
                None or OpenAI text parts ([{"type": "text", "text": ...}]); roles system, user, assistant
                (developer = system).
            stream, user, **sampling: as in `generate`.
            allow_control_tokens: opt-out for your own raw control text: markers in content become control tokens.
                Never set it for text from someone else.
        Returns:
            The reply text, or an iterator of text chunks when stream=True.
        Raises:
            MessageError: a message cannot be rendered (the error names its index).
        """
        return self._run(self._chat_ids(messages, allow_control_tokens), stream, user, sampling)

    def _chat_ids(self, messages, allow_control_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode_chat(messages, allow_control_tokens=allow_control_tokens)

    def _run(self, ids: list[int], stream: bool, user: str | None, sampling: dict):
        policy = self._policy(sampling)
        params = SamplingParams(**sampling_params(sampling))
        handle = self._thread.submit(ids, params, user or "local", policy)
        it = stream_texts(handle)
        if stream:
            return it
        return "".join(it)


    def submit(self, prompt_ids: list[int], user: str | None = None, **sampling):
        """Low-level: queue token ids and get a RequestHandle yielding engine Events (ids, text, usage)."""
        policy = self._policy(sampling)
        return self._thread.submit(list(prompt_ids), SamplingParams(**sampling_params(sampling)), user or "local", policy)

    def _policy(self, kw: dict):
        """Pops per-request kv_policy/budget/sinks/h2o_recent; None = the model's default policy."""
        given = {k: kw.pop(k) for k in ("kv_policy", "budget", "sinks", "h2o_recent") if kw.get(k) is not None}
        for k in ("kv_policy", "budget", "sinks", "h2o_recent"):
            kw.pop(k, None)
        if not given:
            return None
        d = self.config.policy
        kind, budget = given.get("kv_policy", d.kind), given.get("budget", d.budget)
        sinks, recent = given.get("sinks", d.sinks), given.get("h2o_recent", d.recent)
        check_policy(self.config.kv, kind, budget, sinks, recent)  # the KV format before the budget
        return PolicyConfig(kind=kind, budget=budget, sinks=sinks, recent=recent)

    def next_token_logits(self, prompt_ids: list[int], user: str | None = None):
        """Float32 numpy logits of the token after `prompt_ids` (uses and fills the prefix cache)."""
        return self._thread.call(lambda eng: eng.next_token_logits(list(prompt_ids), user or "local"))

    # -- cache ----------------------------------------------------------------------------------------
    def kv_cache_stats(self) -> dict:
        """Returns KV pool and prefix-cache statistics.

        Returns:
            A dict with total_size, used_size (bytes), blocks_total, blocks_used, blocks_cached, blocks_free,
            prompt_cache_hits, prompt_cache_misses (requests), hit_tokens, miss_tokens, hit_rate, evictions,
            fragmentation, per_user ({user: {requests, hit_tokens, miss_tokens}}), groups (KV bytes per layer
            group: "full", "window" (one per sliding window W, its own window blocks) and "state", each with
            slots, blocks_total/used/cached, total_size, used_size, cached_size) and a few more.
        """
        return self._thread.call(lambda eng: eng.stats())

    def kv_block_map(self) -> list[str]:
        """State of every KV block: "free", "used", "shared", "cached" or "pinned"."""
        return self._thread.call(lambda eng: eng.block_map())

    def clear_kv_cache(self, session=None) -> int:
        """Forgets cached prompt prefixes that no request is using (pinned prefixes stay).

        Args:
            session: a Session (or the name of one of the "local" user's): release and forget only its blocks
                (its next turn recomputes, or promotes them from SSD).

        Returns:
            The number of blocks dropped.
        """
        if session is not None:
            key = (session.user, session.name) if isinstance(session, Session) else ("local", check_name(session))
            return self._thread.call(lambda eng: eng.clear_cache(key))
        return self._thread.call(lambda eng: eng.clear_cache())

    @property
    def info(self) -> dict:
        """What is loaded and how."""
        f = self.facts
        return {
            "model": f.model_name, "path": f.model_path, "family": f.family, "fingerprint": f.fingerprint,
            "weights": f.weights, "max_context": f.max_context, "kv_dtype": f.kv_dtype, "kv_blocks": f.kv_blocks,
            "block_size": f.block_size, "kv_format": f.kv_format, "kv_quantized": f.kv_quantized,
        }

    # -- sessions -------------------------------------------------------------------------------------
    def create_session(self, name: str | None = None, user: str | None = None) -> Session:
        """Starts a named conversation whose K/V stay resident between turns.

        Args:
            name: letters, digits, '.', '_', '-' (default: a timestamp). user: owner (default "local").
        Returns:
            The Session; raises SessionError if the user already has a session of that name, or (before
            anything else) when this distributed run cannot save sessions (docs/distributed.md, Limits).
        """
        self._check_sessions()
        user = user or "local"
        if name is None:  # a timestamp, made unique: two sessions started within one second get -2, -3, ...
            stamp = time.strftime("session-%Y%m%d-%H%M%S")
            name = next(n for n in (stamp if i == 1 else f"{stamp}-{i}" for i in itertools.count(1))
                        if (user, n) not in self._sessions and not session_path(user, n).exists())
        key = (user, check_name(name))
        if key in self._sessions or session_path(user, name).exists():
            raise SessionError(f"session {name!r} already exists for user {user!r}; pick another name or load it")
        s = Session(self, name, user)
        self._sessions[key] = s
        return s

    def load_session(self, path_or_name: str | Path, user: str | None = None, *, name: str | None = None) -> Session:
        """Opens a session by name or from a session file, restoring its K/V without recomputing.

        Args:
            path_or_name: the name of one of the user's sessions (open, or saved in the data dir; a name wins over
                a file of the same name in the working directory), else the path of a session file, e.g. one
                written by `s.save("alice_session.zkvs")` or `s.export(path)`.
            user: owner (default "local").
            name: open a file's session under this name instead of the one stored in the file.
        Returns:
            The Session. When the file's session is already open (or saved in the data dir) for the user and holds
            the same conversation (same messages and tokens), that session: loading the file you just saved hands
            back the open session, unchanged.
        Raises:
            SessionError: no such session or file, or the name is taken by a different conversation (then pass
            `name=` to open the file as another session); SessionFormatError / SessionMismatchError as in
            `import_session`.
        """
        self._check_sessions()
        user = user or "local"
        try:
            key = (user, check_name(path_or_name))
        except SessionError:
            key = None  # not a plain name: a path
        if key is not None:
            if key in self._sessions:
                if name is not None and name != key[1]:
                    raise SessionError(f"session {key[1]!r} is already open; name= renames only a session loaded "
                                       f"from a file: call load_session({key[1]!r}) without name=")
                return self._sessions[key]
            if session_path(user, key[1]).exists():
                return self._restore(session_path(user, key[1]), user, name=name, keep_file=True)
        p = Path(path_or_name)
        if not is_file(path_or_name):
            looks_like_path = isinstance(path_or_name, Path) or any(c in str(path_or_name) for c in "/\\") \
                or str(path_or_name).endswith(".zkvs")
            if not looks_like_path and not session_file.is_valid_name(str(path_or_name)):
                check_name(str(path_or_name), "session name (and no such session file)")
            rule = "" if session_file.is_valid_name(str(path_or_name)) else f" (a session name uses {NAME_RULE})"
            raise SessionError(f"no session named {str(path_or_name)!r} for user {user!r} and no session file at "
                               f"{p.resolve()}{rule}; see model.list_sessions(user={user!r}) for the saved ones")
        return self._restore(p, user, name=name, keep_file=True)

    def open_session(self, name: str, user: str | None = None) -> Session:
        """Opens the user's session by name only: the open one, else the one saved in the user's data dir.

        Unlike `load_session`, a name is never read as a file path (a file of that name in the working
        directory is never opened); the server uses this.

        Args:
            name: a session name (see `create_session`). user: owner (default "local").
        Returns:
            The Session; raises SessionError for a bad name or when the user has no such session.
        """
        self._check_sessions()
        user = user or "local"
        key = (user, check_name(name))
        if key in self._sessions:
            return self._sessions[key]
        if not session_path(user, name).exists():
            raise SessionError(f"no session named {name!r} for user {user!r}")
        return self._restore(session_path(user, name), user, name=None, keep_file=True)

    def import_session(self, path: str, name: str | None = None, user: str | None = None) -> Session:
        """Imports a session file (e.g. from another machine) into the data dir; all or nothing.

        Raises:
            SessionFormatError for a corrupt/truncated/unknown file, SessionMismatchError for another model or
            KV format (the message names both), SessionError if the name is taken.
        """
        self._check_sessions()
        if name is not None:
            check_name(name)  # before reading a possibly large file
        s = self._restore(Path(path), user or "local", name=name, keep_file=False)
        s.save()
        return s

    def _restore(self, path: Path, user: str, name: str | None, keep_file: bool) -> Session:
        data = session_file.read(path)
        meta = data.meta
        session_file.check_compatible(meta, self.facts.fingerprint, self.facts.kv_format, path)
        name = check_name(name or meta["name"])
        key = (user, name)
        if keep_file:
            same = open_same_conversation(self._sessions.get(key), user, name, path, meta)
            if same is not None:
                return same
        if key in self._sessions:
            raise SessionError(f"session {name!r} is already open for user {user!r}")
        if not keep_file and session_path(user, name).exists():
            sug = next(f"{name}-{i}" for i in range(2, 10**6) if not session_path(user, f"{name}-{i}").exists()
                       and (user, f"{name}-{i}") not in self._sessions)
            raise SessionError(f"session {name!r} already exists for user {user!r}; import it under another name, "
                               f"e.g. {sug!r} (Python: name={sug!r}; CLI: zkv-mlx sessions import PATH {sug}; "
                               f"server: POST /v1/sessions/import?name={sug})")
        ids = meta["token_ids"]
        vocab = self.facts.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:  # such ids would index past the embedding on the next turn or save
            raise SessionFormatError(f"{path}: token id {bad} is outside this model's vocabulary of {vocab} ids "
                                     f"(0..{vocab - 1}); the file is corrupt or was made for another tokenizer")
        s = Session(self, name, user, meta["messages"], ids, meta.get("created_at"), meta.get("updated_at"))
        ks, vs = session_file.join_sinks(data)
        self._thread.call(lambda e: e.set_pins((user, name), e.import_kv(user, ids, ks, vs)))
        if "state" in meta and self.facts.has_state:
            st = meta["state"]
            self._thread.call(lambda e: e.import_state(user, ids, st["blocks"], data.state, st["dtypes"]))
        s._dirty = not keep_file
        self._sessions[key] = s
        return s

    def list_sessions(self, user: str | None = None) -> list[dict]:
        """Infos of the user's sessions: open ones and those saved in the data dir.

        Returns:
            One dict per session, as `Session.info()` (`created_at` / `updated_at` ISO-8601 UTC strings, None for a
            file without them; `tier` "disk" and `cache_size_bytes` 0 for sessions that are not open).
        """
        user = user or "local"
        out = {s.name: s.info() for (u, _), s in self._sessions.items() if u == user}
        for name, _, meta in saved_sessions(user):
            if name in out or isinstance(meta, SessionError):
                continue  # a corrupt file is reported when it is opened
            out[name] = {"name": name, "user": user, "context_length": len(meta["token_ids"]),
                         "cache_size_bytes": 0, "created_at": iso_utc(meta.get("created_at")),
                         "updated_at": iso_utc(meta.get("updated_at")), "tier": "disk",
                         "messages": len(meta["messages"])}
        return list(out.values())

    def close_session(self, name: str, user: str | None = None) -> None:
        """Closes an open session without deleting its file (saving unsaved turns first)."""
        s = self._sessions.pop((user or "local", check_name(name)), None)
        if s is None:
            raise SessionError(f"no open session named {name!r}")
        if s._dirty and s.token_ids:
            s.save()
        s.release()

    def delete_session(self, name: str, user: str | None = None) -> None:
        """Deletes a session (open or saved) and its file."""
        user = user or "local"
        key = (user, check_name(name))
        s = self._sessions.pop(key, None)
        if s is not None:
            s.release()
        if not delete_file(user, name) and s is None:
            raise SessionError(f"no session named {name!r} for user {user!r}")

    def close(self) -> None:
        """Saves sessions with unsaved turns, then stops the engine thread."""
        if not self._thread._thread.is_alive():
            return
        for s in list(self._sessions.values()):
            if s._dirty and s.token_ids:
                try:
                    s.save()
                except Exception as e:  # never lose the engine shutdown over one session
                    print(f"zkv-mlx: could not save session {s.name!r}: {e}", file=sys.stderr)
        self._thread.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_live: "weakref.WeakSet[ZKV]" = weakref.WeakSet()


@atexit.register
def _shutdown() -> None:
    # Engine threads must end (and release their MLX streams) before the interpreter does.
    for m in list(_live):
        m.close()
    import mlx.core as mx

    mx.clear_streams()
