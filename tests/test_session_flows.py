"""Issue 17 section 8: the session flows users copy from docs (save to a path, load that path, in one process and
in a new model), what load_session does with a name vs a path, and ISO-8601 UTC times wherever users see them."""

import json
import re
from datetime import datetime, timezone

import pytest
from starlette.testclient import TestClient

from zkv_mlx import ZKV
from zkv_mlx.cli import main as cli_main
from zkv_mlx.errors import SessionError
from zkv_mlx.server import create_app
from zkv_mlx.storage import session_file
from zkv_mlx.timestamps import iso_utc

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
GREEDY = dict(temperature=0, max_tokens=4)


def _epoch(iso: str) -> int:
    return int(datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())


@pytest.fixture
def tiny(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture
def model(tiny, tmp_path, monkeypatch):
    # Fresh data/cache dirs per test: saved sessions of one test must not collide with another's.
    monkeypatch.setenv("ZKV_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ZKV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    m = ZKV(tiny, kv_cache_memory="32MB")
    yield m
    m.close()


def test_classic_flow_load_the_file_just_saved_gives_the_open_session(model):
    s = model.create_session(name="user_123")
    s.chat("Hello, my name is Alice.", **GREEDY)
    s.chat("What is my name?", **GREEDY)
    assert s.save("alice_session.zkvs").name == "alice_session.zkvs"
    s2 = model.load_session("alice_session.zkvs")
    assert s2 is s  # the same conversation: the open session, not an error
    n = len(s2.messages)
    s2.chat("Thanks!", **GREEDY)
    assert len(s2.messages) == n + 2 and s2.messages[-2]["content"] == "Thanks!"
    # a pathlib.Path and an absolute path are paths too
    s.save("alice_session.zkvs")
    from pathlib import Path
    assert model.load_session(Path("alice_session.zkvs")) is s
    assert model.load_session(str(Path("alice_session.zkvs").resolve())) is s


def test_classic_flow_in_a_new_model_restores_the_file(tiny, model):
    s = model.create_session(name="user_123")
    s.chat("Hello, my name is Alice.", **GREEDY)
    s.chat("What is my name?", **GREEDY)
    s.save("alice_session.zkvs")
    messages, ids = list(s.messages), list(s.token_ids)
    model.close()  # also saves the session to the data dir (unsaved turns): the same conversation
    with ZKV(tiny, kv_cache_memory="32MB") as m2:
        s2 = m2.load_session("alice_session.zkvs")
        assert s2.name == "user_123" and s2.messages == messages and s2.token_ids == ids
        before = m2.kv_cache_stats()["hit_tokens"]
        s2.chat("Thanks!", **GREEDY)
        assert m2.kv_cache_stats()["hit_tokens"] - before == len(ids) // 16 * 16  # restored K/V, not recomputed
        assert m2.load_session("user_123") is s2  # by name: the open one
        assert m2.load_session("alice_session.zkvs", name="copy").name == "copy"  # the file as another session


def test_loading_a_file_whose_name_holds_another_conversation_names_a_fix_that_works(tiny, model):
    s = model.create_session(name="user_123")
    s.chat("Hello, my name is Alice.", **GREEDY)
    s.save("alice_session.zkvs")
    s.chat("What is my name?", **GREEDY)  # the open session moved on: no longer the file's conversation
    with pytest.raises(SessionError, match=r"already open with another conversation") as e:
        model.load_session("alice_session.zkvs")
    fix = re.search(r"model\.load_session\('alice_session\.zkvs', name='user_123-2'\)", str(e.value))
    assert fix, str(e.value)
    old = model.load_session("alice_session.zkvs", name="user_123-2")  # the suggested fix, as printed
    assert old.name == "user_123-2" and len(old.messages) == 2 and len(s.messages) == 4
    old.chat("Thanks!", **GREEDY)
    model.close()  # saves user_123 (4 messages) to the data dir
    with ZKV(tiny, kv_cache_memory="32MB") as m2:
        # the data dir holds another conversation named user_123: loading the file must not overwrite it later
        with pytest.raises(SessionError, match=r"already saved in .*user_123\.zkvs with another conversation"):
            m2.load_session("alice_session.zkvs")
        assert m2.load_session("alice_session.zkvs", name="user_123-3").messages == old.messages[:2]
        assert len(m2.load_session("user_123").messages) == 4


def test_load_session_errors_and_save_to_a_directory(model, tmp_path):
    with pytest.raises(SessionError, match=r"no session named 'nope' for user 'local' and no session file"):
        model.load_session("nope")
    with pytest.raises(SessionError, match=r"no session named .*missing\.zkvs.* no session file"):
        model.load_session(str(tmp_path / "missing.zkvs"))
    s = model.create_session("trip")
    s.chat("Hi", **GREEDY)
    d = tmp_path / "backups"
    d.mkdir()
    assert s.save(d) == d / "trip.zkvs" and (d / "trip.zkvs").is_file()
    assert model.load_session(str(d / "trip.zkvs")) is s
    with pytest.raises(SessionError, match=r"the path is empty"):
        s.save("")
    with pytest.raises(SessionError, match=r"name= renames only a session loaded from a file"):
        model.load_session("trip", name="other")


def test_times_are_iso_8601_utc_in_api_cli_and_server(model, capsys):
    s = model.create_session("trip", user="alice")
    info = s.info()
    assert ISO.match(info["created_at"]) and ISO.match(info["updated_at"]), info
    assert _epoch(info["created_at"]) == int(s.created_at)
    s.chat("Hi", **GREEDY)
    assert _epoch(s.info()["updated_at"]) == int(s.updated_at) >= _epoch(info["created_at"])
    s.save()
    model.close_session("trip", user="alice")
    (listed,) = model.list_sessions(user="alice")  # read from the file: the format keeps Unix times
    assert listed["tier"] == "disk" and listed["created_at"] == info["created_at"], listed
    assert isinstance(session_file.read_meta(s.path)["created_at"], float)

    assert cli_main(["sessions", "info", "trip", "--user", "alice", "--json"]) == 0
    cli_info = json.loads(capsys.readouterr().out)
    assert cli_info["created_at"] == info["created_at"] and ISO.match(cli_info["updated_at"])
    assert cli_main(["sessions", "list", "--user", "alice", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "trip" and ISO.match(row["updated_at"])

    client = TestClient(create_app(model), base_url="http://127.0.0.1")
    r = client.get("/v1/sessions/trip", headers={"Authorization": "Bearer x"})
    assert r.status_code == 404  # no api keys: the caller is "anonymous", who has no session "trip"
    model.create_session("web", user="anonymous")
    body = client.get("/v1/sessions/web").json()
    assert ISO.match(body["created_at"]) and ISO.match(body["updated_at"]), body
    assert all(ISO.match(i["created_at"]) for i in client.get("/v1/sessions").json()["data"])


def test_old_files_without_or_with_odd_times_still_list_and_load(model):
    s = model.create_session("old")
    s.chat("Hi", **GREEDY)
    p = s.save()
    model.close_session("old")
    data = session_file.read(p)
    del data.meta["created_at"]
    data.meta["updated_at"] = float("nan")
    session_file.write(p, data)
    (listed,) = model.list_sessions()
    assert listed["created_at"] is None and listed["updated_at"] is None
    s2 = model.load_session("old")
    assert ISO.match(s2.info()["created_at"])  # a time is assigned when the file has none
    # a hand-edited time that is no time is neither shown nor written back
    model.close_session("old")
    data = session_file.read(p)
    data.meta["created_at"], data.meta["updated_at"] = "yesterday", 1e30
    session_file.write(p, data)
    (listed,) = model.list_sessions()
    assert listed["created_at"] is None and listed["updated_at"] is None
    s3 = model.load_session("old")
    assert ISO.match(s3.info()["created_at"]) and ISO.match(s3.info()["updated_at"])
    s3.save()
    meta = session_file.read_meta(p)
    assert isinstance(meta["created_at"], float) and isinstance(meta["updated_at"], float)


@pytest.mark.parametrize("t,want", [(1705314600, "2024-01-15T10:30:00Z"), (1705314600.9, "2024-01-15T10:30:00Z"),
                                    (0, "1970-01-01T00:00:00Z"), (None, None), (float("inf"), None), (1e300, None),
                                    ("2024-01-15T10:30:00Z", "2024-01-15T10:30:00Z"), (True, None),
                                    ("yesterday", None)])
def test_iso_utc(t, want):
    assert iso_utc(t) == want


def test_importing_a_taken_name_suggests_a_name_that_works(model, tmp_path):
    s = model.create_session("dup")
    s.chat("Hi", **GREEDY)
    f = s.export(tmp_path / "dup.zkvs")
    s.save()
    model.close_session("dup")
    with pytest.raises(SessionError) as e:
        model.import_session(str(f))
    msg = str(e.value)
    sug = re.search(r"name='([^']+)'", msg).group(1)
    assert sug == "dup-2" and f"zkv-mlx sessions import PATH {sug}" in msg and "name=..." not in msg
    assert model.import_session(str(f), name=sug).name == sug  # the suggested fix works as written
    model.delete_session(sug)
    model.delete_session("dup")
