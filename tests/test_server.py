"""The OpenAI-compatible server (issue 8): a live uvicorn server on loopback, driven by the official `openai`
package, on a tiny random-weight model. Users, the bounded queue, client disconnects, sessions (stubbed until
they land in the API) and schemathesis against the app's OpenAPI spec."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from starlette.testclient import TestClient

from zkv_mlx import ZKV
from zkv_mlx.errors import ConfigError
from zkv_mlx.server import create_app, load_api_keys

KEYS = {"sk-alice": "alice", "sk-bob": "bob"}
OCTETS = "application/octet-stream"
# Longer than a few KV blocks (16 tokens), so a repeat can hit the prefix cache.
LONG = ("The quick brown fox jumps over the lazy dog while the careful engineer measures every block of the "
        "cache twice before trusting a single number in the report.")


# -- helpers ----------------------------------------------------------------------------------------------

class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def client(self, key: str = "sk-alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Record:
    def __init__(self, user, sampling):
        self.user = user
        self.sampling = sampling
        self.events = []
        self.cancelled = False
        self.t_first = self.t_done = None


class Spy:
    """The real model, recording each request the server submits; with `gate` set, the server sees no event of
    a request until the gate opens (so it stays in flight as long as a test needs)."""

    def __init__(self, model):
        self._model = model
        self.records: list[Record] = []
        self.gate: threading.Event | None = None

    def __getattr__(self, name):
        return getattr(self._model, name)

    def submit(self, ids, user=None, **sampling):
        rec = Record(user, sampling)
        self.records.append(rec)
        return _SpyHandle(self._model.submit(ids, user=user, **sampling), rec, self.gate)


class _SpyHandle:
    def __init__(self, handle, rec, gate):
        self._handle, self._rec, self._gate = handle, rec, gate

    @property
    def done(self):
        return self._handle.done

    def __iter__(self):
        if self._gate is not None:
            assert self._gate.wait(30)
        for ev in self._handle:
            if self._rec.t_first is None:
                self._rec.t_first = time.monotonic()
            self._rec.events.append(ev)
            yield ev
        self._rec.t_done = time.monotonic()

    def cancel(self):
        self._rec.cancelled = True
        self._handle.cancel()


def wait_for(pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def chat_args(content: str, **kw) -> dict:
    return dict(model="default", messages=[{"role": "user", "content": content}], temperature=0, **kw)


# -- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = ZKV(str(tiny_model_dir("llama")), kv_cache_memory="64MB")
    yield m
    m.close()


@pytest.fixture(scope="module")
def spy(model):
    return Spy(model)


@pytest.fixture(scope="module")
def server(spy):
    s = LiveServer(create_app(spy, api_keys=KEYS))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def stats(server, key="sk-alice") -> dict:
    r = httpx.get(server.url + "/v1/kv/stats", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200
    return r.json()


# -- chat, streaming, completions -------------------------------------------------------------------------

def test_chat_completion(client, model):
    r = client.chat.completions.create(**chat_args("Hello there", max_tokens=8))
    assert r.object == "chat.completion"
    assert r.model == model.info["model"]
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == model.chat("Hello there", temperature=0, max_tokens=8)
    assert choice.finish_reason in ("length", "stop")
    u = r.usage
    assert u.completion_tokens <= 8 and u.prompt_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0


def test_streaming_chat_equals_non_streaming(client):
    args = chat_args("Tell me a story", max_tokens=12)
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"] or finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 12
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt just ran


def test_completions_text_tokens_and_stream(client, model):
    r = client.completions.create(model="default", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == model.generate("Once upon a time", temperature=0, max_tokens=6)
    ids = model.tokenizer.encode("Once upon a time")
    by_ids = client.completions.create(model=model.info["model"], prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="default", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True))
    assert streamed == r.choices[0].text
    seeded = [client.completions.create(model="default", prompt="Hi", max_tokens=6, temperature=1.0, seed=-7,
                                        top_p=0.9).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_stop_and_models(client, server):
    full = client.completions.create(model="default", prompt="Once upon a time", max_tokens=6,
                                     temperature=0).choices[0].text
    stop = full.strip().split()[0] if full.strip() else "zzz"
    cut = client.completions.create(model="default", prompt="Once upon a time", max_tokens=6, temperature=0,
                                    stop=[stop])
    assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"
    ids = [m.id for m in client.models.list().data]
    assert len(ids) == 1
    assert client.models.retrieve("default").id == ids[0]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


# -- errors -----------------------------------------------------------------------------------------------

def test_errors_have_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(**{**chat_args("hi"), "model": "gpt-4o"})
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**chat_args("hi", max_tokens=0))
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**{**chat_args("hi"), "temperature": 7})
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="default", prompt="word " * 2000, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="default", prompt=[10**9], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.AuthenticationError) as e:
        server.client("sk-wrong").models.list()
    assert e.value.body["code"] == "invalid_api_key"
    # Not JSON at all, and JSON of the wrong shape: 400 with the error object, never a 5xx.
    url = server.url + "/v1/chat/completions"
    auth = {"Authorization": "Bearer sk-alice", "Content-Type": "application/json"}
    for body in (b"{not json", b"[]", b'{"messages": "hi"}', b'{"messages": [{"role": "tool", "content": 1}]}'):
        r = httpx.post(url, content=body, headers=auth)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_no_key_is_anonymous_and_require_key(server, spy):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and spy.records[-1].user == "anonymous"
    strict = TestClient(create_app(spy, api_keys=KEYS, require_key=True), base_url="http://127.0.0.1")
    r = strict.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert strict.get("/v1/models", headers={"Authorization": "Bearer sk-bob"}).status_code == 200
    with pytest.raises(ConfigError):
        create_app(spy, require_key=True)  # no keys: nobody could ever get in


# -- users ------------------------------------------------------------------------------------------------

def test_two_keys_users_are_isolated(server, spy):
    alice, bob = server.client("sk-alice"), server.client("sk-bob")
    args = chat_args(LONG + " (isolation)", max_tokens=2)
    first = alice.chat.completions.create(**args, user="bob")  # the key's user wins over the body's
    assert spy.records[-1].user == "alice"
    again = alice.chat.completions.create(**args)
    # Alice's earlier requests may have cached the template's system prompt; now her whole prompt is cached.
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens_details.cached_tokens + 32
    other = bob.chat.completions.create(**args)  # Bob's first request in this module
    assert spy.records[-1].user == "bob"
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # no cross-user prefix hit
    a, b = stats(server, "sk-alice"), stats(server, "sk-bob")
    assert set(a["per_user"]) == {"alice"} and set(b["per_user"]) == {"bob"}
    assert b["per_user"]["bob"]["hit_tokens"] == 0 and a["per_user"]["alice"]["hit_tokens"] >= 32


# -- continuous batching, queue, disconnects --------------------------------------------------------------

def test_sixteen_concurrent_streams_equal_solo_runs(client, server, spy):
    prompts = [f"Story number {i}: the {w} went" for i, w in enumerate(
        "cat dog owl fox cow bee ant elk yak emu hen pig ram koi eel bat".split())]
    solo = [client.chat.completions.create(**chat_args(p, max_tokens=16)).choices[0].message.content
            for p in prompts]
    start = threading.Barrier(len(prompts))
    n_before = len(spy.records)

    def stream(p):
        c = server.client()
        start.wait()
        return "".join(ch.choices[0].delta.content or ""
                       for ch in c.chat.completions.create(**chat_args(p, max_tokens=16), stream=True))

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream, p) for p in prompts]
        # The event loop stays free while 16 requests generate.
        t0 = time.monotonic()
        assert httpx.get(server.url + "/health").status_code == 200
        assert time.monotonic() - t0 < 2.0
        outs = [f.result(timeout=120) for f in futures]
    assert outs == solo
    recs = spy.records[n_before:]
    overlap = max(sum(1 for r in recs if r.t_first <= x.t_first < r.t_done) for x in recs)
    assert overlap >= 4, "the streams did not decode together"


def test_queue_full_answers_429(model):
    gated = Spy(model)
    gated.gate = threading.Event()
    s = LiveServer(create_app(gated, max_queue=2))
    try:
        c = s.client("any")
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(lambda: c.chat.completions.create(**chat_args("hold", max_tokens=3)))
                    for _ in range(2)]
            wait_for(lambda: len(gated.records) == 2)
            with pytest.raises(openai.RateLimitError) as e:
                c.chat.completions.create(**chat_args("one too many", max_tokens=3))
            assert e.value.body["code"] == "rate_limit_exceeded"
            assert e.value.response.headers["retry-after"] == "1"
            gated.gate.set()
            assert all(f.result(timeout=30).choices[0].message.content is not None for f in held)
        c.chat.completions.create(**chat_args("room again", max_tokens=3))  # the slots came back
    finally:
        gated.gate.set()
        s.close()


def _idle(server):
    st = stats(server)
    return st["running"] == 0 and st["waiting"] == 0 and st["blocks_used"] == 0


def test_disconnect_cancels_and_frees_blocks(server, spy):
    url = server.url + "/v1/chat/completions"
    auth = {"Authorization": "Bearer sk-alice"}
    body = chat_args("Go on forever", max_tokens=450)
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=auth) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept open: leaving a for loop over it would already close the connection
        assert sum(next(lines).startswith("data: ") for _ in range(4)) == 2  # events end with a blank line
        rec = spy.records[-1]
        assert stats(server)["blocks_used"] > 0 and not rec.cancelled
    wait_for(lambda: rec.events and rec.events[-1].kind == "done")
    assert rec.cancelled and rec.events[-1].finish_reason == "cancelled"
    assert rec.events[-1].usage["completion_tokens"] < 450
    wait_for(lambda: _idle(server))
    # A non-streaming request whose client gives up is cancelled too.
    n = len(spy.records)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, headers=auth, timeout=httpx.Timeout(10, read=0.5))
    rec = spy.records[n]
    wait_for(lambda: rec.events and rec.events[-1].kind == "done")
    assert rec.cancelled and rec.events[-1].finish_reason == "cancelled"
    wait_for(lambda: _idle(server))


# -- sessions ---------------------------------------------------------------------------------------------

class _Tok:
    vocab_size = 100


class _NoSessionsModel:
    """Just what the server reads from a model, without the session API (as before sessions existed)."""

    info = {"model": "stub", "max_context": 64, "fingerprint": "f"}
    tokenizer = _Tok()


def test_sessions_unavailable_is_501_in_openai_shape():
    c = TestClient(create_app(_NoSessionsModel()), base_url="http://127.0.0.1")
    for method, path in [("GET", "/v1/sessions"), ("POST", "/v1/sessions"), ("GET", "/v1/sessions/x"),
                         ("DELETE", "/v1/sessions/x"), ("GET", "/v1/sessions/x/export")]:
        r = c.request(method, path)
        assert r.status_code == 501, (method, path)
        assert r.json()["error"]["code"] == "sessions_unavailable"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert c.post("/v1/sessions/import", content=b"x", headers={"Content-Type": OCTETS}).status_code == 501


def test_sessions_per_user_export_import(server, model):
    alice, bob = ({"Authorization": f"Bearer {k}"} for k in KEYS)
    get = lambda path, who: httpx.get(server.url + path, headers=who)  # noqa: E731
    s = model.create_session("trip", user="alice")  # a conversation made through the Python API
    s.chat("Plan a short trip", temperature=0, max_tokens=8)
    assert "trip" in [x["name"] for x in get("/v1/sessions", alice).json()["data"]]
    assert "trip" not in [x["name"] for x in get("/v1/sessions", bob).json()["data"]]
    info = get("/v1/sessions/trip", alice).json()
    assert info["user"] == "alice" and info["context_length"] > 0
    # Bob can neither see, export nor delete Alice's session.
    for method, path in [("GET", "/v1/sessions/trip"), ("GET", "/v1/sessions/trip/export"),
                         ("DELETE", "/v1/sessions/trip")]:
        r = httpx.request(method, server.url + path, headers=bob)
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    r = get("/v1/sessions/trip/export", alice)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert "trip.zkvs" in r.headers["content-disposition"]
    # Alice hands the file to Bob, who uploads it: now he has his own copy.
    up = httpx.post(server.url + "/v1/sessions/import?name=trip-copy", content=r.content,
                    headers={**bob, "Content-Type": OCTETS})
    assert up.status_code == 200, up.text
    assert up.json()["user"] == "bob" and up.json()["context_length"] == info["context_length"]
    bad = httpx.post(server.url + "/v1/sessions/import", content=r.content[:-100],
                     headers={**bob, "Content-Type": OCTETS})
    # the message names the upload, not the server's temp file
    assert bad.status_code == 400 and "the uploaded session file" in bad.json()["error"]["message"]
    assert "zkv-import-" not in bad.json()["error"]["message"]
    assert httpx.post(server.url + "/v1/sessions/import", content=b"garbage",
                      headers={**bob, "Content-Type": OCTETS}).status_code == 400
    made = httpx.post(server.url + "/v1/sessions", json={"name": "blank"}, headers=alice)
    assert made.status_code == 200 and made.json()["user"] == "alice"
    again = httpx.post(server.url + "/v1/sessions", json={"name": "blank"}, headers=alice)
    assert again.status_code == 400 and "already exists" in again.json()["error"]["message"]
    assert httpx.post(server.url + "/v1/sessions", json={"name": "../x"}, headers=alice).status_code == 400
    for who, name in [(alice, "trip"), (alice, "blank"), (bob, "trip-copy")]:
        r = httpx.delete(server.url + f"/v1/sessions/{name}", headers=who)
        assert r.json() == {"id": name, "object": "session.deleted", "deleted": True}
    assert get("/v1/sessions", alice).json()["data"] == [] == get("/v1/sessions", bob).json()["data"]
    wait_for(lambda: _idle(server))  # deleted sessions unpin their blocks


# -- API-keys file, CLI -----------------------------------------------------------------------------------

def test_load_api_keys_json_and_toml(tmp_path):
    j = tmp_path / "keys.json"
    j.write_text(json.dumps(KEYS))
    t = tmp_path / "keys.toml"
    t.write_text('"sk-alice" = "alice"\nsk-bob = "bob"\n')
    assert load_api_keys(j) == KEYS == load_api_keys(t)
    for bad in ("[1, 2]", "{}", '{"k": 3}', "{nope"):
        j.write_text(bad)
        with pytest.raises(ConfigError, match="api-keys"):
            load_api_keys(j)
    with pytest.raises(ConfigError):
        load_api_keys(tmp_path / "missing.json")


def test_cli_serve_rejects_bad_flags_before_loading(capsys, tmp_path):
    from zkv_mlx.cli import main

    assert main(["serve", "--require-key"]) == 1
    assert "--require-key needs --api-keys" in capsys.readouterr().err
    bad = tmp_path / "k.json"
    bad.write_text("{")
    assert main(["serve", "--api-keys", str(bad)]) == 1
    assert "not valid JSON" in capsys.readouterr().err


# -- schemathesis: no server errors for anything the spec allows (and much it does not) --------------------

FUZZ = settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_model(tiny_model_dir):
    # A short context keeps every generated request cheap.
    m = ZKV(str(tiny_model_dir("llama")), kv_cache_memory="16MB", max_context=48)
    yield m
    m.close()


@pytest.fixture(scope="module")
def api_schema(fuzz_model):
    # schemathesis calls the app as Host "testserver": a configured name, like --allow-host.
    return schemathesis.openapi.from_asgi("/openapi.json",
                                          create_app(fuzz_model, max_queue=4, allowed_hosts=["testserver"]))


api = schemathesis.pytest.from_fixture("api_schema")


@api.parametrize()
@FUZZ
def test_schemathesis_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error])
