"""`zkv-mlx sessions list | info NAME | export NAME PATH | import PATH [NEW_NAME] | delete NAME`.

Only `import` loads the model; the other verbs read the user's saved session files (`saved_sessions`).
"""

from __future__ import annotations

import json

from ..cli_common import open_model
from ..errors import SessionError
from ..names import check_name
from ..saved_sessions import delete_file, export_file, read_meta, saved_path, saved_sessions
from ..session import user_dir
from ..timestamps import iso_utc


def operands(args) -> tuple[str | None, str | None]:
    """(session name, file path) from the two positionals: `import PATH [NEW_NAME]` gives them the other way round."""
    if args.action == "import":
        return args.second, args.first
    return args.first, args.second


def _list(user: str, as_json: bool) -> None:
    rows = []
    for name, f, m in saved_sessions(user):
        if isinstance(m, SessionError):
            rows.append({"name": name, "error": f"{m} (remove it: zkv-mlx sessions delete {name})"})
            continue
        rows.append({"name": name, "tokens": len(m["token_ids"]), "messages": len(m["messages"]),
                     "bytes": f.stat().st_size, "model": m.get("model_name"), "updated_at": iso_utc(m.get("updated_at"))})
    if as_json:
        print(json.dumps(rows))
        return
    if not rows:
        print(f"no sessions for user {user!r} (in {user_dir(user)})")
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))


def _info(p, as_json: bool) -> None:
    try:
        m = read_meta(p)
    except SessionError as e:
        raise type(e)(f"{e} (or remove it: zkv-mlx sessions delete {p.stem})") from None
    info = {k: m.get(k) for k in ("name", "user", "model_name", "model_fingerprint", "kv_format",
                                   "block_size", "n_blocks", "created_at", "updated_at")}
    info.update(created_at=iso_utc(m.get("created_at")), updated_at=iso_utc(m.get("updated_at")))
    info.update(tokens=len(m["token_ids"]), messages=len(m["messages"]), bytes=p.stat().st_size, path=str(p))
    print(json.dumps(info, indent=None if as_json else 2))


def _import(args, user: str, path: str | None, name: str | None) -> None:
    if not path:
        raise SessionError("zkv-mlx sessions import needs the PATH of a session file")
    if name:
        check_name(name, "new session name")  # before the model loads
    model = open_model(args)
    try:
        s = model.import_session(path, name=name, user=user)
        print(f"imported session {s.name!r} ({len(s.token_ids)} tokens) for user {user!r}")
    finally:
        model.close()


def run(args) -> int:
    user = args.user or "local"
    name, path = operands(args)
    if args.action == "list":
        _list(user, args.json)
        return 0
    if args.action == "import":
        _import(args, user, path, name)
        return 0
    if args.action not in ("info", "export", "delete"):
        raise SessionError(f"unknown sessions action {args.action!r}")
    if not name:
        raise SessionError(f"zkv-mlx sessions {args.action} needs a session NAME")
    p = saved_path(user, name)
    if p is None:
        raise SessionError(f"no saved session named {name!r} for user {user!r}; see `zkv-mlx sessions list`")
    if args.action == "info":
        _info(p, args.json)
    elif args.action == "delete":
        delete_file(user, name)
        print(f"deleted session {name!r}")
    else:
        if not path:
            raise SessionError("zkv-mlx sessions export needs NAME and a destination PATH")
        export_file(p, path)
        print(f"exported {name!r} to {path}")
    return 0
