"""Issue 18, the server: a real `zkv-mlx serve` on 127.0.0.1 (a subprocess) refuses what a web page or a careless
client could make it do. Foreign Host (DNS rebinding) and Origin (cross-site POSTs) are refused, an allow-listed
front end gets CORS; the key is checked before the body is read, bodies are capped; requests are validated
like OpenAI's; an upload cut short logs one line; session names never resolve against the working directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from zkv_mlx.errors import ConfigError
from zkv_mlx.server import create_app
from zkv_mlx.server.guard import normalize_origin

KEY = "sk-alice"
AUTH = {"Authorization": f"Bearer {KEY}"}
FRONT = "http://front.example:3000"  # the allow-listed browser front end
MAX_BODY, MAX_UPLOAD = 1 << 20, 2 << 20
OCTETS = "application/octet-stream"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`zkv-mlx serve` in a subprocess, its working directory, temp directory and log."""

    def __init__(self, model_dir: Path, base: Path):
        self.cwd, self.tmp = base / "cwd", base / "tmp"
        self.cwd.mkdir()
        self.tmp.mkdir()
        keys = base / "keys.json"
        keys.write_text(json.dumps({KEY: "alice"}))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        cmd = [str(Path(sys.executable).parent / "zkv-mlx"), "serve", "--model", str(model_dir),
               "--port", str(self.port), "--kv-cache-memory", "16MB", "--ssd-cache", "off",
               "--api-keys", str(keys), "--require-key", "--allow-origin", FRONT,
               "--max-body", str(MAX_BODY), "--max-upload", str(MAX_UPLOAD)]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TMPDIR": str(self.tmp)})
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "zkv-mlx serve did not start:\n" + self.log()
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))

    def raw(self, head: str, body: bytes = b"", read_timeout: float = 10.0) -> tuple[int, dict, float]:
        """Sends a request head (and part of a body) on a raw socket; returns (status, JSON body, seconds to
        the answer). The socket is left to the caller's unsent bytes: the server must answer without them."""
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=read_timeout) as s:
            s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
            data = b""
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        elapsed = time.monotonic() - t0
        head_bytes, _, payload = data.partition(b"\r\n\r\n")
        return int(head_bytes.split()[1]), json.loads(payload[:_length(data)] or b"{}"), elapsed

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    s = Served(tiny_model_dir("llama"), tmp_path_factory.mktemp("served"))
    yield s
    s.close()


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def _names(served) -> set[str]:
    return {s["name"] for s in httpx.get(served.url + "/v1/sessions", headers=AUTH).json()["data"]}


# -- 1. Host and Origin -----------------------------------------------------------------------------------

def test_foreign_host_is_refused_loopback_names_are_served(served):
    p = served.port
    for host in (f"attacker.example:{p}", "attacker.example", f"127.0.0.1.attacker.example:{p}", "evil:bad"):
        for path in ("/v1/sessions", "/v1/sessions/x/export", "/health"):
            err = _error(httpx.get(served.url + path, headers={**AUTH, "Host": host}), 421)
            assert err["code"] == "host_not_allowed" and repr(host) in err["message"]
            assert "--allow-host" in err["message"] and "allowed_hosts" in err["message"]
            assert "[::1]" in err["message"]  # as a Host header writes it
    for host in (f"127.0.0.1:{p}", f"localhost:{p}", f"[::1]:{p}", "LOCALHOST:1234", "127.0.0.1"):
        assert httpx.get(served.url + "/v1/sessions", headers={**AUTH, "Host": host}).status_code == 200, host


def test_foreign_origin_cannot_change_state_the_allowed_front_end_can(served):
    before = _names(served)
    # A cross-site form or fetch: refused, and nothing is created or planted.
    err = _error(httpx.post(served.url + "/v1/sessions", json={"name": "planted"},
                            headers={**AUTH, "Origin": "http://evil.example"}), 403)
    assert err["code"] == "origin_not_allowed" and "--allow-origin http://evil.example" in err["message"]
    _error(httpx.post(served.url + "/v1/sessions/import?name=planted", content=b"x" * 100,
                      headers={**AUTH, "Origin": "http://evil.example", "Content-Type": "text/plain"}), 403)
    _error(httpx.post(served.url + "/v1/sessions", json={"name": "planted"},
                      headers={**AUTH, "Origin": "null"}), 403)
    _error(httpx.post(served.url + "/v1/sessions", json={"name": "planted"},
                      headers={**AUTH, "Sec-Fetch-Site": "cross-site"}), 403)
    _error(httpx.delete(served.url + "/v1/sessions/planted", headers={**AUTH, "Origin": "http://localhost:9"}), 403)
    # Uploads need their real content type, whoever sends them (no text/plain simple-form POST).
    err = _error(httpx.post(served.url + "/v1/sessions/import?name=planted", content=b"x" * 100,
                            headers={**AUTH, "Content-Type": "text/plain"}), 415)
    assert OCTETS in err["message"]
    assert _names(served) == before
    # A foreign origin gets no CORS grant to read answers either.
    r = httpx.get(served.url + "/v1/sessions", headers={**AUTH, "Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = httpx.options(served.url + "/v1/sessions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    assert _error(pre, 403)["code"] == "origin_not_allowed"  # JSON like every other error
    # The server's own origin (its /docs page) and the allow-listed front end are served, the latter with CORS.
    own = httpx.post(served.url + "/v1/sessions", json={"name": "own-origin"},
                     headers={**AUTH, "Origin": served.url})
    assert own.status_code == 200, own.text
    pre = httpx.options(served.url + "/v1/sessions", headers={
        "Origin": FRONT, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == FRONT
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    r = httpx.post(served.url + "/v1/sessions", json={"name": "from-front"},
                   headers={**AUTH, "Origin": FRONT, "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == FRONT
    # Even its errors are readable there (a front end must see why).
    r = httpx.get(served.url + "/v1/sessions", headers={"Origin": FRONT})
    assert _error(r, 401)["code"] == "missing_api_key" and r.headers["access-control-allow-origin"] == FRONT
    for name in ("own-origin", "from-front"):
        assert httpx.delete(served.url + f"/v1/sessions/{name}", headers=AUTH).status_code == 200


def test_allow_list_and_limits_are_checked_when_the_app_is_built():
    assert normalize_origin("HTTP://Front.Example:3000/") == "http://front.example:3000"
    assert normalize_origin("http://[::1]:5173") == "http://[::1]:5173"
    for bad in ("front.example", "http://x/app", "*", "ftp://x", "http://x:99999"):
        with pytest.raises(ConfigError, match="--allow-origin"):
            normalize_origin(bad)
    with pytest.raises(ConfigError, match="--max-body"):
        create_app(object(), max_body="lots")
    for bad in ("http://x/", "evil.example:99", "", "a b"):
        with pytest.raises(ConfigError, match="--allow-host"):
            create_app(object(), allowed_hosts=[bad])
    from zkv_mlx.server.guard import check_host_name

    assert [check_host_name(h) for h in ("[::2]", "LocalDev.Test", "10.0.0.5")] == ["::2", "localdev.test", "10.0.0.5"]


def test_cli_serve_rejects_bad_guard_flags_before_loading(capsys):
    from zkv_mlx.cli import main

    for flags, word in ((["--allow-origin", "front.example"], "--allow-origin"),
                        (["--max-body", "lots"], "--max-body"), (["--max-upload", "0"], "--max-upload"),
                        (["--allow-host", "evil.example:99"], "--allow-host")):
        assert main(["serve", "--model", "/nonexistent", *flags]) == 1
        err = capsys.readouterr().err
        assert word in err and "Traceback" not in err and "nonexistent" not in err


def test_cli_serve_refuses_a_busy_port_before_loading(capsys):
    from zkv_mlx.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", "/nonexistent", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"--port {port}" in err and "Traceback" not in err and "nonexistent" not in err


# -- 2. key before body, body caps ------------------------------------------------------------------------

def _head(served, path: str, length: int | None, extra: str = "") -> str:
    size = f"Content-Length: {length}\n" if length is not None else "Transfer-Encoding: chunked\n"
    return (f"POST {path} HTTP/1.1\nHost: 127.0.0.1:{served.port}\nContent-Type: application/json\n"
            f"{size}{extra}")


def test_key_is_checked_before_a_20mb_body_is_read(served):
    small = served.raw(_head(served, "/v1/chat/completions", 2), b"{}")
    rss0 = served.rss_kb()
    # 20 MB announced, 64 KB sent: the server must answer without the rest.
    status, body, t_large = served.raw(_head(served, "/v1/chat/completions", 20 << 20), b"x" * (64 << 10))
    assert small[0] == status == 401 and body["error"]["code"] == "missing_api_key"
    assert t_large < max(1.0, 5 * small[2])
    assert served.rss_kb() - rss0 < 8 << 10  # KB: nothing near 20 MB was read or parsed
    # A wrong key is refused the same way.
    status, body, _ = served.raw(_head(served, "/v1/chat/completions", 20 << 20, "Authorization: Bearer sk-x\n"),
                                 b"x" * (64 << 10))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_bodies_are_capped_413_with_the_limit_named(served):
    key = f"Authorization: Bearer {KEY}\n"
    status, body, _ = served.raw(_head(served, "/v1/chat/completions", 20 << 20, key), b"x" * 1024)
    assert status == 413 and f"{MAX_BODY} bytes" in body["error"]["message"]
    assert "--max-body" in body["error"]["message"] and body["error"]["code"] == "request_too_large"
    # Chunked, no length announced: cut off as soon as the cap is passed.
    chunk = b"x" * (256 << 10)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))  # 1.25 MB > 1 MB
    status, body, _ = served.raw(_head(served, "/v1/chat/completions", None, key), chunks)
    assert status == 413 and "--max-body" in body["error"]["message"]
    # The session upload has its own, larger limit: 1.5 MB passes the body cap and reaches the importer.
    r = httpx.post(served.url + "/v1/sessions/import", content=b"x" * (3 << 19),
                   headers={**AUTH, "Content-Type": OCTETS})
    assert r.status_code == 400 and "SessionFormat" in r.json()["error"]["code"]
    upload = _head(served, "/v1/sessions/import", 3 << 20, key).replace("application/json", OCTETS)
    status, body, _ = served.raw(upload, b"x" * 1024)
    assert status == 413 and f"{MAX_UPLOAD} bytes" in body["error"]["message"]
    assert "--max-upload" in body["error"]["message"]
    status, body, _ = served.raw(upload.replace("Content-Length: 3145728", "Transfer-Encoding: chunked"),
                                 chunks + chunks)  # 2.5 MB
    assert status == 413 and "--max-upload" in body["error"]["message"]
    assert list(served.tmp.glob("zkv-*")) == []  # no temp file left behind


# -- 3. validation like OpenAI ----------------------------------------------------------------------------

CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
PROMPT = {"model": "default", "prompt": "hi", "max_tokens": 1}
BAD = [  # (endpoint body, the field the 400 must name, code)
    (CHAT | {"stream": "yes"}, "stream", "invalid_type"),
    (CHAT | {"max_tokens": "3"}, "max_tokens", "invalid_type"),
    (CHAT | {"max_tokens": True}, "max_tokens", "invalid_type"),
    (CHAT | {"temperature": True}, "temperature", "invalid_type"),
    (CHAT | {"temperature": "0.5"}, "temperature", "invalid_type"),
    (CHAT | {"seed": "1"}, "seed", "invalid_type"),
    (CHAT | {"stop": 3}, "stop", "invalid_type"),
    (CHAT | {"temperature": 2.5}, "temperature", "invalid_value"),
    (CHAT | {"top_p": 1.5}, "top_p", "invalid_value"),
    (CHAT | {"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    (CHAT | {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage",
     "invalid_type"),
    (CHAT | {"stream": True, "stream_options": {"bogus": 1}}, "stream_options.bogus", "unknown_parameter"),
    (CHAT | {"top_logprobs": 2}, "top_logprobs", "invalid_value"),
    (CHAT | {"logprobs": True}, "logprobs", "unsupported_parameter"),
    (CHAT | {"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    (CHAT | {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
    (CHAT | {"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
    (CHAT | {"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    (CHAT | {"n": 2}, "n", "unsupported_parameter"),
    (CHAT | {"logit_bias": {"42": -100}}, "logit_bias", "unsupported_parameter"),
    (CHAT | {"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    (CHAT | {"frobnicate": 1}, "frobnicate", "unknown_parameter"),
    (PROMPT | {"max_tokens": "3"}, "max_tokens", "invalid_type"),
    (PROMPT | {"echo": True}, "echo", "unsupported_parameter"),
    (PROMPT | {"best_of": 2}, "best_of", "unsupported_parameter"),
    (PROMPT | {"suffix": "x"}, "suffix", "unsupported_parameter"),
    (PROMPT | {"logprobs": 1}, "logprobs", "unsupported_parameter"),
    (PROMPT | {"prompt": [1, True]}, "prompt.1", "invalid_type"),
    (PROMPT | {"frobnicate": 1}, "frobnicate", "unknown_parameter"),
]
MSG = {"role": "user", "content": "hi"}
BAD_MESSAGES = [  # fields inside a message: never silently ignored
    (MSG | {"foo": 1}, "unknown_parameter"),
    (MSG | {"name": "bob"}, "unsupported_parameter"),
    (MSG | {"tool_call_id": "z"}, "unsupported_parameter"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
     "unsupported_parameter"),
    (MSG | {"function_call": {"name": "f"}}, "unsupported_parameter"),
    (MSG | {"refusal": "no"}, "unsupported_parameter"),
]


@pytest.mark.parametrize("msg, code", BAD_MESSAGES, ids=[c + "-" + "-".join(m) for m, c in BAD_MESSAGES])
def test_unknown_and_unimplemented_message_fields_are_400(served, msg, code):
    err = _error(httpx.post(served.url + "/v1/chat/completions", json=CHAT | {"messages": [MSG, msg]},
                            headers=AUTH), 400)
    assert err["code"] == code and err["param"].startswith("messages.1"), err
    field = next(k for k in msg if k not in ("role", "content"))
    assert field in err["message"], err


def test_nan_and_infinite_numbers_are_400_saying_finite(served):
    for field in ("temperature", "top_p", "min_p", "repetition_penalty"):
        for bad in ("NaN", "Infinity"):  # what JavaScript's JSON.stringify never sends, but Python's json does
            body = json.dumps(CHAT).replace('"max_tokens": 1', f'"max_tokens": 1, "{field}": {bad}')
            err = _error(httpx.post(served.url + "/v1/chat/completions", content=body,
                                    headers={**AUTH, "Content-Type": "application/json"}), 400)
            assert err["param"] == field and "finite" in err["message"], err


def test_image_parts_get_the_apis_message(served):
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]
    err = _error(httpx.post(served.url + "/v1/chat/completions",
                            json=CHAT | {"messages": [{"role": "user", "content": parts}]}, headers=AUTH), 400)
    assert "messages[0]" in err["message"] and "image_url" in err["message"], err


@pytest.mark.parametrize("body, param, code", BAD, ids=[f"{p}-{c}" for _, p, c in BAD])
def test_bad_fields_are_400_naming_the_field(served, body, param, code):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    err = _error(httpx.post(served.url + path, json=body, headers=AUTH), 400)
    assert err["param"] == param and err["code"] == code, err
    assert err["message"].startswith(param + ":"), err
    if code == "unsupported_parameter":
        assert "does not implement" in err["message"]


def test_noop_values_of_unimplemented_fields_are_accepted(served):
    ok = CHAT | {"response_format": {"type": "text"}, "tools": [], "n": 1, "logprobs": False, "temperature": 0,
                 "presence_penalty": 0, "stream": False, "seed": 3}
    r = httpx.post(served.url + "/v1/chat/completions", json=ok, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    r = httpx.post(served.url + "/v1/completions", json=PROMPT | {"echo": False, "best_of": 1, "temperature": 1},
                   headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text


# -- 4. an upload cut short -------------------------------------------------------------------------------

def test_upload_cut_short_logs_one_line(served):
    start = len(served.log())
    with socket.create_connection(("127.0.0.1", served.port)) as s:
        s.sendall((f"POST /v1/sessions/import HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                   f"Content-Type: {OCTETS}\r\nContent-Length: {1 << 20}\r\n\r\n").encode() + b"x" * 100_000)
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while "disconnected" not in served.log()[start:]:
        assert time.monotonic() < deadline, served.log()[start:]
        time.sleep(0.1)
    time.sleep(0.5)  # anything else the server would log about it
    new = served.log()[start:]
    lines = [line for line in new.splitlines() if "uvicorn" not in line and '" 4' not in line]
    assert "Traceback" not in new and len(lines) == 1, new
    assert "100000 bytes" in lines[0]
    assert list(served.tmp.glob("zkv-*")) == []


# -- 5. names never resolve against the working directory; default names are unique ----------------------

def test_export_by_name_ignores_files_in_the_servers_working_directory(served):
    made = httpx.post(served.url + "/v1/sessions", json={"name": "trip"}, headers=AUTH)
    assert made.status_code == 200, made.text
    (served.cwd / "trip").write_bytes(b"planted")
    (served.cwd / "trip.zkvs").write_bytes(b"planted")
    r = httpx.get(served.url + "/v1/sessions/trip/export", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.content != b"planted" and len(r.content) > 100
    assert httpx.delete(served.url + "/v1/sessions/trip", headers=AUTH).status_code == 200
    # Gone: 404, never the planted file.
    assert _error(httpx.get(served.url + "/v1/sessions/trip/export", headers=AUTH), 404)["code"] == \
        "session_not_found"
    assert "trip" not in _names(served)


def test_two_unnamed_sessions_within_a_second_get_distinct_names(served):
    with ThreadPoolExecutor(2) as pool:  # at the same time, so within one second
        a, b = pool.map(lambda _: httpx.post(served.url + "/v1/sessions", headers=AUTH), range(2))
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.json()["name"] != b.json()["name"]
    assert a.json()["name"].startswith("session-") and b.json()["name"].startswith(a.json()["name"][:16])
    for r in (a, b):
        assert httpx.delete(served.url + f"/v1/sessions/{r.json()['name']}", headers=AUTH).status_code == 200


# -- in-process: the same guard in create_app ---------------------------------------------------------------

def test_in_process_app_refuses_testserver_host_unless_configured():
    class _Tok:
        vocab_size = 100

    class _Stub:
        info = {"model": "stub", "max_context": 64, "fingerprint": "f"}
        tokenizer = _Tok()

    assert TestClient(create_app(_Stub())).get("/health").status_code == 421  # Host "testserver"
    assert TestClient(create_app(_Stub(), allowed_hosts=["testserver"])).get("/health").status_code == 200
    assert TestClient(create_app(_Stub(), allowed_hosts=["*"])).get("/health").status_code == 200
