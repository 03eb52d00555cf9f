"""The one way zkv-mlx writes a file: a fresh temp file beside the destination, fsync, rename, fsync the directory.

Every writer (session files, SSD block files, exports, caches) goes through `atomic_write`, so a crash or an error
leaves either the old file or the complete new one, a symlink planted where a temp file would go is never written
through (the temp name is random and opened O_CREAT|O_EXCL|O_NOFOLLOW by `tempfile.mkstemp`), and nothing but the
destination is ever touched (a pre-existing `DEST.tmp` stays as it was).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# Keeps the temp name (prefix + name + mkstemp's 8 random chars + suffix) under the usual 255-byte NAME_MAX.
_MAX_STEM = 100


@contextmanager
def atomic_write(path: str | os.PathLike, mode: int = 0o600) -> Iterator[BinaryIO]:
    """Writes `path` all or nothing.

    Usage: ``with atomic_write(dest) as f: f.write(data)``. When the block ends normally the data is flushed and
    fsynced, the temp file replaces `path` (`os.replace`: a symlink at `path` itself is replaced, not followed) and
    the directory is fsynced so the rename survives a power cut. When anything raises (the block, the fsync or the
    rename, e.g. because `path` is a directory) the temp file is removed, `path` is left as it was and the
    exception propagates.

    Args:
        path: the destination file; its directory must exist.
        mode: permission bits of the new file (default 0o600: session files and KV blocks are private).
    Yields:
        A binary file object open for writing (the temp file).
    Raises:
        OSError: the directory is missing or not writable, the disk is full, `path` is a directory, ...
    """
    path = Path(path)
    directory = path.parent
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + path.name[:_MAX_STEM] + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Makes a rename in `directory` durable (best effort: some filesystems cannot fsync a directory)."""
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
