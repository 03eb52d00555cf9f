"""The command line imports only the verb that runs; faces never read the engine behind the API."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from zkv_mlx.cli import build_parser
from zkv_mlx.commands.sessions import operands

ROOT = Path(__file__).resolve().parents[1]


def test_parsing_imports_no_verb_and_no_engine():
    code = ("import sys, zkv_mlx.cli as c; c.build_parser().parse_args(['sessions', 'list']); "
            "print(sorted(m for m in sys.modules if m.startswith(('zkv_mlx.commands.', 'zkv_mlx.bench', "
            "'zkv_mlx.server', 'zkv_mlx.eval', 'zkv_mlx.api', 'zkv_mlx.engine', 'mlx'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def _verbs(parser):
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            if sub._subparsers is not None:
                yield from _verbs(sub)
            else:
                yield name, sub.get_default("func")


def test_every_verb_names_an_importable_function():
    seen = dict(_verbs(build_parser()))
    assert {"generate", "chat", "stats", "serve", "sessions", "doctor", "decode", "kvmem", "ppl"} <= set(seen)
    for name, func in seen.items():
        module, _, attr = func.target.partition(":")
        assert callable(getattr(importlib.import_module("zkv_mlx." + module), attr)), name


@pytest.mark.parametrize("argv, expect", [
    (["sessions", "import", "trip.zkvs", "paris"], ("paris", "trip.zkvs")),
    (["sessions", "import", "trip.zkvs"], (None, "trip.zkvs")),
    (["sessions", "export", "paris", "out.zkvs"], ("paris", "out.zkvs")),
    (["sessions", "delete", "paris"], ("paris", None)),
])
def test_sessions_operands_are_a_name_and_a_path(argv, expect):
    assert operands(build_parser().parse_args(argv)) == expect


FACES = ["app", "zkv_mlx/server", "zkv_mlx/commands", "zkv_mlx/bench", "zkv_mlx/cli.py", "zkv_mlx/cli_common.py",
         "zkv_mlx/chat_cli.py"]


def test_faces_never_read_the_engine_behind_the_api():
    # ZKV.engine belongs to the engine thread; faces use ZKV's methods and `info` instead.
    hits = []
    for face in FACES:
        p = ROOT / face
        for f in [p] if p.is_file() else sorted(p.rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and node.attr in ("engine", "_thread"):
                    hits.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert hits == []


def test_sessions_import_path_new_name_then_info_export_delete(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from zkv_mlx import ZKV
    from zkv_mlx.cli import main

    tiny = str(tiny_model_dir("llama"))
    monkeypatch.setenv("ZKV_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ZKV_CACHE_DIR", str(tmp_path / "cache"))
    with ZKV(tiny, kv_cache_memory="32MB") as m:
        s = m.create_session(name="trip")
        s.chat("Hello", temperature=0, max_tokens=4)
        src = s.save(tmp_path / "trip.zkvs")
    flags = ["--model", tiny, "--kv-cache-memory", "32MB"]
    assert main(["sessions", "import", str(src), "paris", *flags]) == 0
    assert "imported session 'paris'" in capsys.readouterr().out
    assert main(["sessions", "info", "paris", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "paris"
    saved = next((tmp_path / "data").rglob("paris.zkvs"))
    assert main(["sessions", "export", "paris", str(tmp_path / "out.zkvs")]) == 0
    assert (tmp_path / "out.zkvs").read_bytes() == saved.read_bytes()  # export copies the saved file whole
    from zkv_mlx.storage import session_file

    a, b = session_file.read(src), session_file.read(tmp_path / "out.zkvs")
    assert b.meta["name"] == "paris" and a.meta["token_ids"] == b.meta["token_ids"]
    assert main(["sessions", "delete", "paris"]) == 0
    assert main(["sessions", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [r["name"] for r in rows] == ["trip"]  # saved by close(); "paris" is gone


def test_plain_chat_opens_creates_and_saves_the_named_session(tiny_model_dir, tmp_path):
    """`zkv-mlx chat --plain --session NAME` (also what piped input gets) keeps its turns in that session."""
    import os

    from zkv_mlx.storage import session_file

    env = dict(os.environ, ZKV_DATA_DIR=str(tmp_path / "data"), ZKV_CACHE_DIR=str(tmp_path / "cache"))
    exe = str(Path(sys.executable).parent / "zkv-mlx")
    cmd = [exe, "chat", "--plain", "--model", str(tiny_model_dir("llama")), "--kv-cache-memory", "16MB",
           "--max-tokens", "3", "--temp", "0", "--session", "plain1"]
    for turns in ("hi\n", "again\n"):  # created by the first run, reopened by the second
        r = subprocess.run(cmd, input=turns, capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("assistant> ") == 1 and r.stdout.index("\nyou> ") > r.stdout.index("assistant> ")
    p = next((tmp_path / "data").rglob("plain1.zkvs"))
    users = [m["content"] for m in session_file.read_meta(p)["messages"] if m["role"] == "user"]
    assert users == ["hi", "again"]
    r = subprocess.run(cmd[:-1] + ["a/b"], input="hi\n", capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "invalid session name 'a/b'" in r.stderr and "Traceback" not in r.stderr
    # a saved session that cannot be opened says why (it is not "already exists" from a create attempt)
    p.write_bytes(b"not a session file at all")
    r = subprocess.run(cmd, input="hi\n", capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "not a session file" in r.stderr and "already exists" not in r.stderr
    assert p.read_bytes() == b"not a session file at all"  # and the file is left alone


def test_bench_counts_below_one_fail_in_one_line_before_loading(capsys):
    from zkv_mlx.cli import main

    for argv in (["bench", "decode", "--context", "0"], ["bench", "decode", "--rounds", "0"],
                 ["bench", "batch", "--streams", "-1"], ["bench", "longctx", "--segment", "0"]):
        assert main([*argv, "--model", "/nonexistent"]) == 1
        err = capsys.readouterr().err
        assert argv[2] in err and "must be >= 1" in err and "nonexistent" not in err and "Traceback" not in err


def test_chat_refuses_a_bad_session_name_before_loading(capsys):
    from zkv_mlx.cli import main

    for extra in ([], ["--plain"]):  # the TUI and the plain loop alike
        assert main(["chat", "--model", "/nonexistent", "--session", "a/b", *extra]) == 1
        err = capsys.readouterr().err
        assert "invalid session name 'a/b'" in err and "nonexistent" not in err


def test_sessions_list_names_a_corrupt_file_by_its_session_name_and_delete_removes_it(tmp_path, monkeypatch, capsys):
    from zkv_mlx.cli import main
    from zkv_mlx.saved_sessions import user_dir

    monkeypatch.setenv("ZKV_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ZKV_CACHE_DIR", str(tmp_path / "cache"))
    d = user_dir("local")
    d.mkdir(parents=True)
    (d / "broken.zkvs").write_bytes(b"garbage")
    assert main(["sessions", "list", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["name"] == "broken" and "not a session file" in row["error"]
    assert "zkv-mlx sessions delete broken" in row["error"]
    assert main(["sessions", "delete", "broken"]) == 0  # the fix the message names works
    assert not (d / "broken.zkvs").exists()


@pytest.mark.parametrize("session", [False, True])
def test_plain_chat_message_over_the_context_is_refused_and_the_chat_goes_on(tiny_model_dir, tmp_path, session):
    import os

    env = dict(os.environ, ZKV_DATA_DIR=str(tmp_path / "data"), ZKV_CACHE_DIR=str(tmp_path / "cache"))
    exe = str(Path(sys.executable).parent / "zkv-mlx")
    cmd = [exe, "chat", "--plain", "--model", str(tiny_model_dir("llama")), "--kv-cache-memory", "16MB",
           "--max-context", "64", "--max-tokens", "3", "--temp", "0"] + (["--session", "long1"] if session else [])
    r = subprocess.run(cmd, input="word " * 200 + "\nhi\n", capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "max context is 64" in r.stderr and "the message was not sent" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout.count("assistant> ") == 2 and r.stderr.count("chunks in") == 1  # the short message was answered
