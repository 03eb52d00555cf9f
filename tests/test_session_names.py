"""Issue #18, name and session-file items: one strict session-name rule at every entry point (API, server, TUI;
the CLI's in test_atomic_write.py), token ids checked against the vocabulary on import, and `save()` never writing
a session with fewer K/V blocks than its tokens need. Runs on a tiny random model (block size 8)."""

import asyncio
import os

import pytest

from zkv_mlx import ZKV
from zkv_mlx.errors import SessionError, SessionFormatError
from zkv_mlx.storage import session_file

BAD_NAMES = ["trip\n", "a/b", "..", "x\x00", "\x1b[31m"]
RULE = "letters, digits"


def assert_names_rule(excinfo, name):
    msg = str(excinfo.value)
    assert repr(name) in msg and RULE in msg, msg


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    with ZKV(str(tiny_model_dir("llama")), kv_cache_memory="16MB", block_size=8, max_context=512) as m:
        yield m


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """A valid session file of the tiny model (3 full blocks), and its data."""
    s = model.create_session("src")
    s.chat("one two three four five six seven eight nine ten", temperature=0, max_tokens=8)
    p = s.export(tmp_path_factory.mktemp("src") / "src.zkvs")
    model.delete_session("src")
    data = session_file.read(p)
    assert data.meta["n_blocks"] >= 2
    return p, data


def _variant(data, tmp_path, **meta):
    """The exported file with some metadata replaced (written with valid checksums)."""
    d = session_file.SessionData(meta=dict(data.meta, **meta), k=data.k, v=data.v, sinks=data.sinks)
    p = tmp_path / "variant.zkvs"
    session_file.write(p, d)
    return p


@pytest.mark.parametrize("name", BAD_NAMES)
def test_every_api_entry_point_rejects_bad_names(model, exported, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ".." is a directory here, and no file is named like any bad name
    free = model.kv_cache_stats()["blocks_free"]
    calls = [lambda: model.create_session(name), lambda: model.load_session(name),
             lambda: model.delete_session(name), lambda: model.close_session(name),
             lambda: model.import_session(str(exported[0]), name=name),
             lambda: model.clear_kv_cache(session=name)]
    for call in calls:
        with pytest.raises(SessionError) as e:
            call()
        assert_names_rule(e, name)
    # a name stored inside the file is held to the same rule
    with pytest.raises(SessionFormatError) as e:
        model.import_session(str(_variant(exported[1], tmp_path, name=name)))
    assert_names_rule(e, name)
    assert model.kv_cache_stats()["blocks_free"] == free
    assert all(i["name"] == "src" or session_file.is_valid_name(i["name"]) for i in model.list_sessions())
    sessions = model._sessions
    assert all(session_file.is_valid_name(n) for _, n in sessions)
    assert not any(os.path.exists(p) for p in ("trip", "a", "x"))


def test_valid_names_still_work(model, exported):
    s = model.import_session(str(exported[0]), name="trip.v2_a-1")
    assert s.name == "trip.v2_a-1" and s.path.name == "trip.v2_a-1.zkvs" and s.path.exists()
    assert model.load_session("trip.v2_a-1") is s
    model.delete_session("trip.v2_a-1")
    assert not s.path.exists()


@pytest.mark.parametrize("bad_id", ["vocab", -1])
def test_out_of_vocabulary_ids_are_rejected_on_import(model, exported, bad_id, tmp_path):
    vocab = model.engine.lm.model.model.embed_tokens.weight.shape[0]
    tid = vocab if bad_id == "vocab" else bad_id
    data = exported[1]
    ids = list(data.token_ids)
    ids[3] = tid
    p = _variant(data, tmp_path, name="oov", token_ids=ids)
    free = model.kv_cache_stats()["blocks_free"]
    for call in (lambda: model.import_session(str(p)), lambda: model.load_session(str(p))):
        with pytest.raises(SessionFormatError) as e:
            call()
        assert f"token id {tid} " in str(e.value) and f"vocabulary of {vocab} ids" in str(e.value), str(e.value)
    assert model.kv_cache_stats()["blocks_free"] == free
    assert "oov" not in [i["name"] for i in model.list_sessions()]


def test_save_never_writes_fewer_blocks_than_the_tokens_need(model, monkeypatch):
    s = model.create_session("whole")
    s.chat("alpha beta gamma delta epsilon zeta eta theta iota kappa", temperature=0, max_tokens=8)
    path = s.save()
    before = path.read_bytes()
    need = len(s.token_ids) // 8
    assert session_file.read(path).meta["n_blocks"] == need >= 2
    # The blocks cannot be recovered (not even by the recompute): a typed error, the saved file untouched.
    monkeypatch.setattr(model.engine, "full_blocks", lambda user, ids: [], raising=False)
    with pytest.raises(SessionError, match=rf"need {need} KV blocks but only 0"):
        s.save()
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == sorted(n for n in os.listdir(path.parent) if not n.startswith("."))
    monkeypatch.undo()
    model.delete_session("whole")


def test_server_session_routes_answer_400_for_bad_names(model, exported):
    from starlette.testclient import TestClient

    from zkv_mlx.server import create_app
    from zkv_mlx.server.errors import from_engine_error

    with TestClient(create_app(model), base_url="http://127.0.0.1") as client:
        for name in BAD_NAMES:
            r = client.post("/v1/sessions", json={"name": name})
            assert r.status_code == 400, (name, r.text)
            r = client.post("/v1/sessions/import", params={"name": name}, content=exported[0].read_bytes(),
                            headers={"content-type": "application/octet-stream"})
            assert r.status_code == 400, (name, r.text)
        assert all(session_file.is_valid_name(s["name"]) for s in client.get("/v1/sessions").json()["data"])
    # what the routes do with the API's error: a 400 whose message names the value and the rule
    for name in BAD_NAMES:
        with pytest.raises(SessionError) as e:
            model.create_session(name)
        err = from_engine_error(e.value)
        assert err.status == 400 and repr(name) in err.message and RULE in err.message


# -- TUI (the fake engine; the dialogs apply the same rule before calling it) ----------------------------------------

TUI_BAD = ["a/b", "..", "x\x00", "\x1b[31m"]  # the dialog's one-line Input strips a trailing newline


def test_tui_new_rename_and_import_dialogs_reject_bad_names(tmp_path, monkeypatch):
    from zkv_mlx.app import make_app
    from zkv_mlx.app.fake import FakeZKV
    from zkv_mlx.app.file_dialog import FileDialog
    from zkv_mlx.app.text_prompt_screen import TextPromptScreen
    from test_tui import SIZE, dialog, focus_session, loaded, until

    monkeypatch.chdir(tmp_path)
    fake = FakeZKV(sessions=("alpha",))
    app = make_app(lambda: fake, stats_interval=0)

    def errors():
        return [n.message for n in app._notifications if n.severity == "error"]

    async def submit(value):
        app.clear_notifications()
        (await dialog(pilot, TextPromptScreen)).query_one("#text").value = value
        await pilot.press("enter")
        await until(pilot, lambda: errors(), timeout=30)
        assert repr(value) in errors()[-1] and RULE in errors()[-1], errors()[-1]

    async def run():
        nonlocal pilot
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot)
            for name in TUI_BAD:
                app.session_action("new")
                await submit(name)
                await focus_session(pilot, "alpha")
                await pilot.press("r")
                await submit(name)
            # import: "alpha" is taken, so the app asks for a name; bad ones are refused there too
            path = tmp_path / "alpha.zkvs"
            fake.load_session("alpha").export(path)
            for name in TUI_BAD:
                app.session_action("import")
                (await dialog(pilot, FileDialog)).query_one("#path").value = str(path)
                await pilot.press("enter")
                await submit(name)
            assert sorted(fake._sessions) == ["alpha"]

    pilot = None
    asyncio.run(run())
    # `zkv-mlx chat --session NAME` with a bad name: a notification, no session
    fake2 = FakeZKV()
    app = make_app(lambda: fake2, stats_interval=0, session="a/b")

    async def run2():
        async with app.run_test(size=SIZE) as p:
            await until(p, lambda: errors(), timeout=30)
            assert repr("a/b") in errors()[-1]
            assert not fake2._sessions

    asyncio.run(run2())
