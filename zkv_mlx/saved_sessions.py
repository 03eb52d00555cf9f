"""A user's saved session files in the data dir, without a model: list, read, export.

`ZKV.list_sessions` and the `zkv-mlx sessions` verbs share these, so the file layout is read in one place.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import SessionError
from .session import Session, session_path, user_dir
from .storage import session_file
from .storage.atomic import atomic_write
from .storage.session_file import SUFFIX


def saved_sessions(user: str) -> Iterator[tuple[str, Path, dict | SessionError]]:
    """Yields (name, path, meta) for each session file of the user, sorted; meta is the SessionError of a file
    that cannot be read (callers decide whether to report or skip it)."""
    d = user_dir(user)
    for f in sorted(d.glob("*" + SUFFIX)) if d.is_dir() else []:
        try:
            meta = session_file.read_meta(f)
        except SessionError as e:
            meta = e
        yield f.name[: -len(SUFFIX)], f, meta


def saved_path(user: str, name: str) -> Path | None:
    """The file of the user's saved session `name`, or None when there is none (a bad name raises)."""
    p = session_path(user, name)
    return p if p.exists() else None


def read_meta(path: Path) -> dict:
    """The metadata of a session file (SessionFormatError for a corrupt one)."""
    return session_file.read_meta(path)


def read_file(path: Path) -> session_file.SessionData:
    """Reads and checks a whole session file (K/V included); SessionFormatError for a corrupt one."""
    return session_file.read(path)


def export_file(src: Path, dest: str) -> None:
    """Copies a checked session file to `dest` through `atomic_write`: only `dest` changes, and only when the copy
    is whole. Raises SessionError for a corrupt source (never hand one out) or an unwritable destination."""
    read_file(src)
    copy_file(src, dest)


def copy_file(src, dest: str) -> None:
    """Copies `src` to `dest` through `atomic_write` (SessionError names a directory or unwritable `dest`)."""
    d = Path(dest)
    if d.is_dir():
        raise SessionError(f"cannot export to {dest}: it is a directory; give a file path such as "
                           f"{d / Path(src).name}")
    if str(dest).endswith(("/", "\\")):  # "newdir/" names a directory that is not there
        raise SessionError(f"cannot export to {dest}: there is no such directory; create it first "
                           f"(mkdir -p {dest}) and export to {d / Path(src).name}")
    try:
        with open(src, "rb") as fin, atomic_write(d) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    except OSError as e:
        raise SessionError(f"cannot export to {dest}: {e.strerror or e}; check that its directory exists and is "
                           "writable") from None


def delete_file(user: str, name: str) -> bool:
    """Deletes the user's saved session file `name`; returns whether there was one."""
    p = session_path(user, name)
    existed = p.exists()
    p.unlink(missing_ok=True)
    return existed


def open_same_conversation(open_s: Session | None, user: str, name: str, path: Path, meta: dict) -> Session | None:
    """For `load_session(file)`: the open session when it holds the file's conversation; None to restore the file.

    Raises SessionError when the session's name is taken (open, or saved in the data dir) by another
    conversation, which loading the file would replace or, on the next save, overwrite.
    """
    def same(messages, token_ids) -> bool:
        return messages == meta["messages"] and list(token_ids) == list(meta["token_ids"])

    saved = session_path(user, name)
    if open_s is not None:
        if same(open_s.messages, open_s.token_ids):
            return open_s
        taken = "is already open with another conversation"
    elif saved.exists() and saved.resolve() != path.resolve():
        try:
            m = session_file.read_meta(saved)
        except SessionError:
            m = None  # unreadable: still not ours to overwrite
        if m is not None and same(m["messages"], m["token_ids"]):
            return None
        taken = f"is already saved in {saved} with another conversation"
    else:
        return None
    user_arg = "" if user == "local" else f", user={user!r}"
    raise SessionError(f"session {name!r} of user {user!r} {taken} than {path}; open the file under another "
                       f"name: model.load_session({str(path)!r}{user_arg}, name={name[:126] + '-2'!r})")
