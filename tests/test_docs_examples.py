"""Issue 17 section 8: every code example in README.md and docs/*.md runs as written.

The ```python blocks run verbatim (exec of the block's text) against the bundled model with fresh ZKV_DATA_DIR /
ZKV_CACHE_DIR and a temporary working directory. Two things are substituted, and only these:
- generation length: a request that names no `max_tokens` gets 8 instead of 256, and any request is capped at 64
  (the server's chat default runs to the end of the context), so the examples take seconds, not minutes;
- the network address: `uvicorn.run(app, port=8080)` serves on a free loopback port in a background thread and
  returns, and `openai.OpenAI(base_url="http://127.0.0.1:8080/v1")` is pointed at that port (8080 may be taken).
TOML and JSON blocks are loaded by the code that reads them; the README's `zkv-mlx` command lines get `--help` for
each verb, and the cheap ones (`sessions list`, `doctor --json`) run as written.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from zkv_mlx import ZKV, api
from zkv_mlx.cli import main as cli_main
from zkv_mlx.config import load_toml, make_config
from zkv_mlx.storage import session_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
DEFAULT_MAX_TOKENS, MAX_TOKENS_CAP = 8, 64


def fenced(path: Path, lang: str) -> list[tuple[int, str]]:
    """(line number, text) of every ```lang block in a markdown file."""
    text = path.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(2))
            for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if m.group(1) == lang]


def block_id(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def run_block(path: Path, line: int, code: str, ns: dict) -> str:
    """Executes one example as written in namespace `ns`; returns what it printed."""
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(code, block_id(path, line), "exec"), ns)
    return out.getvalue()


# Which test runs each ```python block (by file and order in the file). A new example fails
# test_every_python_example_is_run until a test runs it.
RUN_BY = {
    "README.md": ["test_readme_python_examples"] * 5,
    "docs/kernels.md": ["test_kernels_md_simulator_snippet"],
    "docs/server.md": ["test_server_md_python_examples"] * 2,
    "docs/distributed.md": ["test_distributed.py::test_distributed_md_python_example"],
}


def test_every_python_example_is_run():
    found = {str(p.relative_to(ROOT)): len(fenced(p, "python")) for p in DOCS}
    assert {k: v for k, v in found.items() if v} == {k: len(v) for k, v in RUN_BY.items()}


@pytest.fixture
def docs_env(tmp_path, monkeypatch):
    """Fresh data/cache dirs, a temporary working directory and capped generation lengths (see module doc)."""
    monkeypatch.setenv("ZKV_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ZKV_CACHE_DIR", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    orig = api.sampling_params

    def capped(kw: dict) -> dict:
        kw = orig(kw)
        kw["max_tokens"] = min(kw.get("max_tokens", DEFAULT_MAX_TOKENS), MAX_TOKENS_CAP)
        return kw

    monkeypatch.setattr(api, "sampling_params", capped)
    return work


class Spy:
    """Records (method, result) of the ZKV methods an example calls, so a test can check what they returned."""

    def __init__(self, monkeypatch, *names):
        self.calls: list[tuple[str, object]] = []
        for name in names:
            orig = getattr(ZKV, name)

            def wrapped(model, *a, _orig=orig, _name=name, **kw):
                r = _orig(model, *a, **kw)
                self.calls.append((_name, r))
                return r

            monkeypatch.setattr(ZKV, name, wrapped)

    def results(self, name: str) -> list:
        return [r for n, r in self.calls if n == name]


def test_readme_python_examples(docs_env, monkeypatch):
    readme = ROOT / "README.md"
    (first, quick), (ctrl_line, ctrl), (second, prefixes), (third, sessions), (fourth, classic) = \
        fenced(readme, "python")
    spy = Spy(monkeypatch, "load_session", "clear_kv_cache", "import_session")
    ns: dict = {}

    out = run_block(readme, first, quick, ns)
    assert "Paris" in out  # greedy answer of the bundled model
    stats_line = out.strip().splitlines()[-1]
    assert "'blocks_total'" in stats_line and "'hit_tokens'" in stats_line  # the printed kv_cache_stats()

    run_block(readme, second, prefixes, ns)
    model = ns["model"]
    try:
        stats = model.kv_cache_stats()
        # every key the README's comment names exists (`ssd_*`: at least one ssd_ key)
        comment = next(ln for ln in prefixes.splitlines() if ln.startswith("model.kv_cache_stats()"))
        for key in re.findall(r"[a-z_*]+", comment.split("#", 1)[1]):
            assert any(re.fullmatch(key.replace("*", ".+"), k) for k in stats), (key, sorted(stats))
        assert stats["per_user"]["alice"]["hit_tokens"] >= 16  # alice's chat hit the preloaded shared prefix
        assert isinstance(spy.results("clear_kv_cache")[0], int)
        assert "pinned" in model.kv_block_map()  # the preloaded prefix stays after clear_kv_cache()

        # the control-marker opt-out (its `model` is any open ZKV; the first example's is closed by now)
        run_block(readme, ctrl_line, ctrl, ns)
        assert "allow_control_tokens=True" in ctrl

        run_block(readme, third, sessions, ns)
        assert (docs_env / "trip.zkvs").is_file()
        assert model.list_sessions(user="alice") == []  # deleted
        assert [i["name"] for i in model.list_sessions()] == ["trip"]  # the import, for the default user
        assert spy.results("import_session")[0].messages == ns["s"].messages
        assert spy.results("load_session")[0] is ns["s"]

        run_block(readme, fourth, classic, ns)
        s = ns["s"]
        saved = session_file.read_meta(docs_env / "alice_session.zkvs")
        assert saved["name"] == "user_123" and len(saved["messages"]) == 4
        assert spy.results("load_session")[1] is s  # loading the file just saved: the open session
        assert spy.results("clear_kv_cache")[1] > 0  # the session's own blocks were dropped
        assert s.messages == [] and ISO.match(s.info()["created_at"])
        assert "user_123" not in [i["name"] for i in model.list_sessions()]  # closed, cleared: nothing to save
    finally:
        model.close()


def test_kernels_md_simulator_snippet(monkeypatch):
    import mlx.core as mx

    (line, code), = fenced(ROOT / "docs/kernels.md", "python")
    run_block(ROOT / "docs/kernels.md", line, code, {"monkeypatch": monkeypatch, "mx": mx})
    from metal_sim import fake_metal_kernel

    assert mx.fast.metal_kernel is fake_metal_kernel and os.environ["ZKV_KERNELS"] == "metal"


def test_readme_toml_config_loads(tmp_path):
    (line, text), = fenced(ROOT / "README.md", "toml")
    p = tmp_path / "zkv-mlx.toml"
    p.write_text(text)
    cfg = make_config(load_toml(p))
    assert cfg.max_context == 4096 and cfg.policy.kind == "full" and cfg.policy.budget == 2048
    assert [x.name for x in cfg.prompt_cache.prefixes] == ["team"]


def test_server_md_api_key_files_and_json_examples(tmp_path):
    from zkv_mlx.server import load_api_keys

    doc = ROOT / "docs/server.md"
    want = {"sk-alice-3f9c2a": "alice", "sk-bob-81d0e7": "bob"}
    (_, toml_keys), = [b for b in fenced(doc, "toml") if "sk-alice" in b[1]]
    (tmp_path / "keys.toml").write_text(toml_keys)
    assert load_api_keys(str(tmp_path / "keys.toml")) == want
    for _, text in fenced(doc, "json"):
        value = json.loads(text)  # response and error examples are valid JSON too
        if "sk-alice-3f9c2a" in value:
            (tmp_path / "keys.json").write_text(text)
            assert load_api_keys(str(tmp_path / "keys.json")) == want


def _serve_in_background(started: list):
    import uvicorn

    def run(app, host="127.0.0.1", port=8080, **kw):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((host, 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        started.append((server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"))

    return run


def test_server_md_python_examples(docs_env, monkeypatch):
    import openai
    import uvicorn

    doc = ROOT / "docs/server.md"
    (line_app, app_code), (line_client, client_code) = fenced(doc, "python")
    (_, toml_keys), = [b for b in fenced(doc, "toml") if "sk-alice" in b[1]]
    (docs_env / "keys.toml").write_text(toml_keys)  # the keys file the example loads, as the doc shows it
    started: list = []
    monkeypatch.setattr(uvicorn, "run", _serve_in_background(started))
    ns: dict = {}
    run_block(doc, line_app, app_code, ns)
    (server, thread, url), = started
    try:
        class Redirected(openai.OpenAI):
            def __init__(self, *a, base_url=None, **kw):
                super().__init__(*a, base_url=base_url.replace("http://127.0.0.1:8080", url), **kw)

        monkeypatch.setattr(openai, "OpenAI", Redirected)
        out = run_block(doc, line_client, client_code, ns)
        assert ns["r"].choices[0].message.content and ns["r"].usage.completion_tokens > 0
        assert "CompletionUsage(" in out  # the stream's last chunk carried usage, and the example printed it
        with pytest.raises(openai.AuthenticationError):  # --require-key as in the example
            openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="sk-wrong", max_retries=0).models.list()

        # The curl examples, against the same server (port substituted): sessions need one to exist.
        (line_sh, sh), = fenced(doc, "sh")
        alice = ns["model"].create_session("trip", user="alice")
        alice.chat("Hi", temperature=0, max_tokens=4)
        script = sh.replace("http://127.0.0.1:8080", url).replace("curl ", "curl -sS --fail-with-body ")
        res = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, timeout=300,
                             cwd=docs_env)
        assert res.returncode == 0, res.stderr + res.stdout
        assert "data: [DONE]" in res.stdout and '"chat.completion"' in res.stdout
        bob = [i for i in ns["model"].list_sessions(user="bob")]
        assert [i["name"] for i in bob] == ["alice-trip"] and bob[0]["messages"] == 2
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        ns["model"].close()


# -- the README's command lines -------------------------------------------------------------------------------

def readme_commands() -> list[str]:
    """`zkv-mlx ...` lines of the README (indented code), without their comments."""
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("    zkv-mlx ")]
    return [ln.split("  #")[0].strip() for ln in lines]


def verbs(line: str) -> list[str]:
    """The command words of a README line, e.g. ['bench', 'decode'] or ['sessions']."""
    words = shlex.split(line)[1:]
    out = [words[0]]
    if words[0] in ("bench", "eval") and len(words) > 1:
        out.append(words[1])
    return out


def test_readme_commands_have_help(capsys):
    cmds = {tuple(verbs(c)) for c in readme_commands()}
    assert {("chat",), ("serve",), ("generate",), ("doctor",), ("sessions",), ("bench", "decode"),
            ("eval", "ppl")} <= cmds
    for v in sorted(cmds):
        with pytest.raises(SystemExit) as e:
            cli_main([*v, "--help"])
        assert e.value.code == 0, v
        assert "usage: zkv-mlx " + " ".join(v) in capsys.readouterr().out, v


def test_readme_cheap_commands_run_without_traceback(tmp_path):
    env = dict(os.environ, ZKV_DATA_DIR=str(tmp_path / "data"), ZKV_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("ZKV_DEBUG", None)
    cli = [sys.executable, "-m", "zkv_mlx.cli"]
    r = subprocess.run(cli + ["sessions", "list"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith("no sessions for user 'local'")
    r = subprocess.run(cli + ["doctor", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr
    assert isinstance(json.loads(r.stdout), dict)
