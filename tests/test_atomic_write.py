"""Issue #18, file items: every file goes through `atomic_write` (fresh exclusive temp beside DEST, fsync, rename,
cleanup on failure), so planted symlinks and pre-existing `DEST.tmp` files are never written through or destroyed
and a failed write leaves the old DEST and nothing else. Fast: no model is loaded."""

import os
import subprocess
import sys

import numpy as np
import pytest

from zkv_mlx.errors import SessionError
from zkv_mlx.storage import session_file
from zkv_mlx.storage.atomic import atomic_write
from zkv_mlx.storage.ssd_store import SSDStore


def _tree(d):
    """{relative path: (kind, content or link target)} of everything under d, symlinks not followed."""
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, d)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir", None)
            else:
                out[rel] = ("file", open(p, "rb").read())
    return out


def _session_data(name="trip", n_blocks=2, fill=1.0):
    shape = (n_blocks, 2, 4, 8)
    meta = {"name": name, "user": "local", "model_fingerprint": "f" * 32, "model_name": "x",
            "kv_format": "float32", "dtype": "float32", "n_layers": 1, "n_kv_heads": 2, "block_size": 4,
            "head_dim": 8, "n_blocks": n_blocks, "block_shape": [2, 4, 8],
            "token_ids": list(range(n_blocks * 4 + 1)), "messages": [{"role": "user", "content": "hi"}]}
    k = [np.full(shape, fill, np.float32)]
    return session_file.SessionData(meta=meta, k=k, v=k)


@pytest.fixture
def planted(tmp_path):
    """A destination dir with DEST.tmp as a symlink to a file outside it, and a regular DEST.tmp beside another DEST."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"victim's data")
    d = tmp_path / "dest"
    d.mkdir()
    (d / "out.bin.tmp").symlink_to(victim)
    (d / "dangling.bin.tmp").symlink_to(outside / "created-through-link")
    (d / "other.bin.tmp").write_bytes(b"someone's temp file")
    return d, outside


def test_symlinked_and_preexisting_tmp_paths_are_untouched(planted):
    d, outside = planted
    before, outside_before = _tree(d), _tree(outside)
    for name in ("out.bin", "dangling.bin", "other.bin"):
        with atomic_write(d / name) as f:
            f.write(b"new " + name.encode())
    after = _tree(d)
    assert _tree(outside) == outside_before  # nothing written through a link, nothing created outside
    assert {k: v for k, v in after.items() if k in before} == before  # every DEST.tmp exactly as it was
    assert set(after) - set(before) == {"out.bin", "dangling.bin", "other.bin"}  # no temp file left behind
    assert after["out.bin"] == ("file", b"new out.bin")
    assert oct(os.stat(d / "out.bin").st_mode & 0o777) == oct(0o600)


def test_writer_raising_midway_leaves_old_dest_and_no_temp(tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"old contents")
    before = _tree(tmp_path)
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(dest) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk on fire")
    assert _tree(tmp_path) == before


def test_dest_is_a_directory_leaves_no_temp(tmp_path):
    dest = tmp_path / "adir"
    dest.mkdir()
    (dest / "keep").write_bytes(b"x")
    before = _tree(tmp_path)
    with pytest.raises(OSError):
        with atomic_write(dest) as f:
            f.write(b"y" * 100_000)
    assert _tree(tmp_path) == before


def test_session_file_write_failures_keep_old_file(tmp_path, monkeypatch):
    dest = tmp_path / "trip.zkvs"
    session_file.write(dest, _session_data(fill=1.0))
    (tmp_path / "trip.zkvs.tmp").write_bytes(b"not ours")
    before = _tree(tmp_path)
    # the fsync fails (e.g. EIO on a full disk): typed error, old file intact, no temp file
    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(SessionError, match="Input/output error"):
        session_file.write(dest, _session_data(fill=2.0))
    monkeypatch.undo()
    assert _tree(tmp_path) == before
    assert np.all(session_file.read(dest).k[0] == 1.0)
    # a directory as the destination: typed error naming it, nothing written
    with pytest.raises(SessionError, match="is a directory"):
        session_file.write(tmp_path, _session_data())
    assert _tree(tmp_path) == before


def test_ssd_block_writes_leave_only_block_files(tmp_path):
    store = SSDStore(tmp_path / "ssd", 1 << 20)
    (tmp_path / "ssd" / "keep.kvb.tmp").write_bytes(b"not ours")  # not a dot-file: start-up cleanup skips it
    k = np.ones((2, 2, 4, 8), np.float32)
    store.put(b"\x01" * 32, list(range(4)), k, k)
    store.flush()
    store.close()
    names = sorted(os.listdir(tmp_path / "ssd"))
    assert names == sorted([(b"\x01" * 32).hex() + ".kvb", "keep.kvb.tmp"])
    assert (tmp_path / "ssd" / "keep.kvb.tmp").read_bytes() == b"not ours"
    assert SSDStore(tmp_path / "ssd", 1 << 20).get(b"\x01" * 32, list(range(4)))[0].shape == k.shape


def _cli(args, tmp_path):
    env = dict(os.environ, ZKV_DATA_DIR=str(tmp_path / "data"), ZKV_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "zkv_mlx.cli", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)


def _one_line_error(r, *needles):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zkv-mlx: error:"), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_cli_sessions_export_end_to_end(tmp_path, planted):
    d, outside = planted
    src = tmp_path / "data" / "sessions" / "local" / "trip.zkvs"
    session_file.write(src, _session_data())
    # DEST.tmp is a symlink to a file outside: the export lands in DEST only
    outside_before, dest_before = _tree(outside), _tree(d)
    r = _cli(["sessions", "export", "trip", str(d / "out.bin")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (d / "out.bin").read_bytes() == src.read_bytes()
    assert _tree(outside) == outside_before
    after = _tree(d)
    assert {k: v for k, v in after.items() if k in dest_before} == dest_before
    assert set(after) - set(dest_before) == {"out.bin"}
    # exporting again over an existing DEST replaces it; the pre-existing regular DEST.tmp survives
    r = _cli(["sessions", "export", "trip", str(d / "other.bin")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (d / "other.bin.tmp").read_bytes() == b"someone's temp file"
    # DEST is a directory: one-line error naming it, no temp file anywhere, the directory as it was
    before = _tree(tmp_path)
    r = _cli(["sessions", "export", "trip", str(d)], tmp_path)
    _one_line_error(r, "is a directory", str(d))
    assert _tree(tmp_path) == before
    # "newdir/" names a directory even when there is none yet: refused, no file called "newdir" appears
    r = _cli(["sessions", "export", "trip", str(tmp_path / "newdir") + "/"], tmp_path)
    _one_line_error(r, "no such directory", "mkdir -p")
    assert _tree(tmp_path) == before


def test_export_copy_failing_midway_keeps_old_dest(tmp_path, monkeypatch):
    import shutil

    from zkv_mlx.saved_sessions import copy_file as _export_file

    src = tmp_path / "src.zkvs"
    session_file.write(src, _session_data())
    dest = tmp_path / "old.zkvs"
    dest.write_bytes(b"the previous export")
    before = _tree(tmp_path)

    def copy_half(fin, fout, length=0):
        fout.write(fin.read(100))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", copy_half)
    with pytest.raises(SessionError, match="No space left on device"):
        _export_file(src, str(dest))
    assert _tree(tmp_path) == before


BAD_NAMES = ["trip\n", "a/b", "..", "x\x00", "\x1b[31m"]


@pytest.mark.parametrize("action", ["info", "export", "delete"])
@pytest.mark.parametrize("name", [n for n in BAD_NAMES if "\x00" not in n])  # argv cannot hold a NUL byte
def test_cli_sessions_reject_bad_names(tmp_path, action, name):
    (tmp_path / "data" / "sessions" / "local").mkdir(parents=True)
    session_file.write(tmp_path / "data" / "sessions" / "local" / "trip.zkvs", _session_data())
    before = _tree(tmp_path)
    r = _cli(["sessions", action, name, str(tmp_path / "x.zkvs")], tmp_path)
    _one_line_error(r, repr(name), "letters, digits")
    assert _tree(tmp_path) == before


def test_cli_sessions_import_rejects_a_bad_new_name(tmp_path):
    src = tmp_path / "src.zkvs"
    session_file.write(src, _session_data())
    r = _cli(["sessions", "import", str(src), "a/b"], tmp_path)
    _one_line_error(r, repr("a/b"), "letters, digits")
    assert not (tmp_path / "data" / "sessions").exists()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_session_path_rejects_bad_names(name):
    from zkv_mlx.session import session_path

    with pytest.raises(SessionError) as e:
        session_path("local", name)
    assert repr(name) in str(e.value) and "letters, digits" in str(e.value)


@pytest.mark.parametrize("user", ["alice\n", "..", "a/b", "u-" + "0" * 16])
def test_odd_user_ids_get_a_hashed_directory(user):
    from zkv_mlx.session import user_dir

    d = user_dir(user)
    assert d.parent.name == "sessions" and d.name.startswith("u-") and d.name != user
    assert d.name.isascii() and d.name.replace("-", "").isalnum()
    assert user_dir("alice").name == "alice"
