"""Pilot tests of the chat TUI (zkv_mlx.app) against the fake engine: no model is loaded here."""

import asyncio
import functools
import io
import threading
import time

import pytest
from rich.console import Console

from zkv_mlx.app import make_app
from zkv_mlx.app.backend import Backend, CacheStats
from zkv_mlx.app.turn import TurnMetrics
from zkv_mlx.app.block_map import cells
from zkv_mlx.app.cache_panel import CachePanel
from zkv_mlx.app.chat_app import ZkvChatApp
from zkv_mlx.app.chat_view import ChatMessage
from zkv_mlx.app.confirm_screen import ConfirmScreen
from zkv_mlx.app.fake import FakeZKV, reply_for
from zkv_mlx.app.file_dialog import FileDialog
from zkv_mlx.app.help_screen import HelpScreen
from zkv_mlx.app.loading_screen import LoadingScreen
from zkv_mlx.app.sessions_sidebar import SessionItem, SessionsSidebar
from zkv_mlx.app.text_prompt_screen import TextPromptScreen
from zkv_mlx.errors import ModelLoadError, OutOfKVMemory

SIZE = (110, 26)


def aio(fn):
    """Runs an async test function in a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        asyncio.run(fn(*args, **kwargs))

    return run


def app_with(fake: FakeZKV | None = None, **options):
    fake = fake or FakeZKV()
    return make_app(lambda: fake, stats_interval=0, **options), fake


async def until(pilot, predicate, timeout: float = 10.0) -> None:
    """Lets the app run until predicate() holds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {predicate.__code__.co_names}")
        await asyncio.sleep(0.02)


async def loaded(pilot) -> None:
    app = pilot.app
    await until(pilot, lambda: app.backend is not None and not isinstance(app.screen, LoadingScreen))
    await until(pilot, lambda: app.query_one(SessionsSidebar).query(SessionItem))
    await pilot.pause()


async def send(pilot, text: str) -> None:
    app = pilot.app
    prompt = app.query_one("#prompt")
    prompt.focus()
    prompt.value = text
    await pilot.press("enter")
    await until(pilot, lambda: app.turn is None and app.reply is None)
    await pilot.pause()


async def dialog(pilot, cls):
    """Waits for a dialog screen to be pushed and composed; returns it."""
    await until(pilot, lambda: isinstance(pilot.app.screen, cls) and pilot.app.screen.query("Input, Button"))
    return pilot.app.screen


def text_of(widget) -> str:
    """What a Static shows, as plain text."""
    console = Console(width=500, record=True, file=io.StringIO())
    console.print(widget.content)
    return console.export_text()


def replies(app) -> list[tuple[str, str]]:
    return [(m.role, m.text) for m in app.query(ChatMessage)]


async def focus_session(pilot, name: str | None) -> None:
    sidebar = pilot.app.query_one(SessionsSidebar)
    lv = sidebar.query_one("ListView")
    lv.focus()
    names = [item.session_name for item in lv.query(SessionItem)]
    lv.index = names.index(name)
    await pilot.pause()


# -- chatting -----------------------------------------------------------------------------------------


class RecordingApp(ZkvChatApp):
    """Remembers every streamed chunk (Textual then runs ZkvChatApp's own handler too)."""

    seen: list[str]

    def on_reply_chunk(self, msg) -> None:
        self.seen.append(msg.text)


@aio
async def test_send_message_streams_reply_then_prefix_hit_history_and_stats():
    app = RecordingApp(lambda: FakeZKV(reply_delay=0.01), stats_interval=0)
    app.seen = []
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        panel = app.query_one(CachePanel)
        await until(pilot, lambda: panel.updates >= 1)
        assert panel.stats.get("hit_tokens") == 0
        updates = panel.updates

        app.query_one("#prompt").focus()
        await pilot.press(*"hello", "enter")
        await until(pilot, lambda: app.turn is None)
        await pilot.pause()
        full = reply_for([{"role": "user", "content": "hello"}])
        # The reply reached the widget chunk by chunk: it streamed, it did not arrive at once.
        assert len(app.seen) == len(full.split(" ")) and "".join(app.seen) == full
        assert replies(app) == [("user", "hello"), ("assistant", full)]
        reply = app.query(ChatMessage).last()
        assert "paged KV blocks" in str(reply.query_one("Markdown").source)
        metrics = text_of(reply.query_one(".metrics"))
        assert "TTFT 0.05 s" in metrics and "100.0 tok/s" in metrics and "prefix hit 0/" in metrics
        assert app.conversation[-1] == {"role": "assistant", "content": full}
        assert app.query_one("#prompt").value == ""

        # Second turn: the first exchange is a cached prefix of the new prompt.
        await send(pilot, "second question")
        metrics = text_of(app.query(ChatMessage).last().query_one(".metrics"))
        assert int(metrics.split("prefix hit ")[1].split("/")[0]) > 0

        # The cache panel was refreshed after each turn and shows the saved tokens and cached blocks.
        await until(pilot, lambda: panel.updates >= updates + 2)
        await pilot.pause()
        assert panel.stats.get("hit_tokens") > 0
        assert f"Tokens saved  {panel.stats.get('hit_tokens')}" in text_of(panel.query_one("#figures"))
        assert "cached" in panel.query_one("#block-map").states

        # Input history: Up/Down walk through what was sent, back to an empty draft.
        prompt = app.query_one("#prompt")
        await pilot.press("up")
        assert prompt.value == "second question"
        await pilot.press("up", "up")
        assert prompt.value == "hello"
        await pilot.press("down")
        assert prompt.value == "second question"
        await pilot.press("down")
        assert prompt.value == ""


@aio
async def test_escape_stops_generation_and_quit_closes_the_engine():
    hold = threading.Event()  # replies stop after their first chunk until this is set
    app, fake = app_with(FakeZKV(hold=hold))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.query_one("#prompt").focus()
        await pilot.press(*"hi", "enter")
        await until(pilot, lambda: app.reply is not None and app.reply.text)
        assert "escape" in app.active_bindings  # shown in the footer while generating
        await pilot.press("escape")
        await until(pilot, lambda: app.turn is None)
        reply = app.query(ChatMessage).last()
        assert reply.text == "You"
        assert text_of(reply.query_one(".metrics")).startswith("stopped")
        # The app keeps working after a stop; quitting mid-reply stops it and closes the engine.
        hold.set()
        await send(pilot, "again")
        assert replies(app)[-1][1].startswith("You said: **again**")
        hold.clear()
        await pilot.press(*"bye", "enter")
        await until(pilot, lambda: app.reply is not None and app.reply.text)
        await pilot.press("ctrl+q")
    assert fake.closed and app.return_code == 0


@aio
async def test_engine_error_is_a_notification_not_a_crash():
    app, _ = app_with(FakeZKV(fail=OutOfKVMemory("the prompt needs 900 KV blocks; raise --kv-cache-memory")))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await send(pilot, "boom")
        assert any("raise --kv-cache-memory" in n.message and n.severity == "error"
                   for n in app._notifications)
        assert app.conversation == []  # the unanswered message is not resent next time
        assert app.is_running


@aio
async def test_model_load_failure_shows_error_and_exits_1():
    def factory():
        raise ModelLoadError("no such model: /nope.gguf; pass a .gguf file or an mlx-lm directory")

    app = make_app(factory, stats_interval=0)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.load_error is not None)
        await pilot.pause()
        assert isinstance(app.screen, LoadingScreen)
        assert "no such model" in text_of(app.screen.query_one("#error"))
        await pilot.press("q")
    assert app.return_code == 1


# -- sessions -----------------------------------------------------------------------------------------


@aio
async def test_switch_sessions_shows_their_conversations():
    app, fake = app_with(FakeZKV(sessions=("alpha", "beta")))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await send(pilot, "before")  # in the unsaved chat
        await focus_session(pilot, "beta")
        await pilot.press("enter")
        await until(pilot, lambda: app.backend.session_name == "beta" and app.conversation)
        await pilot.pause()
        assert replies(app)[0] == ("user", "Hello from beta")
        assert "beta" in app.sub_title
        assert app.focused is app.query_one("#prompt")
        await send(pilot, "more")
        assert fake._sessions["beta"].messages[-2] == {"role": "user", "content": "more"}
        await until(pilot, lambda: app.query_one(SessionsSidebar).current == "beta")
        await pilot.press("ctrl+l")  # clears the view and the session's context
        await until(pilot, lambda: fake._sessions["beta"].messages == [])
        assert replies(app) == []

        await focus_session(pilot, "alpha")
        await pilot.press("enter")
        await until(pilot, lambda: app.backend.session_name == "alpha")
        await pilot.pause()
        assert replies(app)[0] == ("user", "Hello from alpha")
        assert fake.saves >= 1  # leaving a session saves it

        # Back to the unsaved chat: its own transcript comes back.
        app.session_action("switch", None)
        await until(pilot, lambda: app.backend.session_name is None and app.query_one(SessionsSidebar).current is None)
        await pilot.pause()
        assert replies(app)[0] == ("user", "before")


@aio
async def test_export_then_import_a_session(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the file dialogs start
    app, fake = app_with(FakeZKV(sessions=("alpha",)))
    path = tmp_path / "alpha.zkvs"
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await focus_session(pilot, "alpha")
        await pilot.press("e")
        (await dialog(pilot, FileDialog)).query_one("#path").value = str(path)
        await pilot.press("enter")
        await until(pilot, path.exists)

        await focus_session(pilot, None)
        await pilot.press("i")
        (await dialog(pilot, FileDialog)).query_one("#path").value = str(path)
        await pilot.press("enter")
        # "alpha" exists already: the app asks for another name (suggesting alpha-imported).
        prompt = await dialog(pilot, TextPromptScreen)
        assert prompt.query_one("#text").value == "alpha-imported"
        await pilot.press("enter")
        await until(pilot, lambda: app.backend.session_name == "alpha-imported")
        await until(pilot, lambda: "alpha-imported" in [r.name for r in app.query_one(SessionsSidebar).rows])
        await pilot.pause()
        assert replies(app)[1] == ("assistant", "Hi! This is the **alpha** session.")
        assert any("Imported alpha.zkvs" in n.message for n in app._notifications)

        # A file that is not a session: an error notification, nothing imported.
        bad = tmp_path / "bad.zkvs"
        bad.write_text("not a session")
        app.session_action("import")
        (await dialog(pilot, FileDialog)).query_one("#path").value = str(bad)
        await pilot.press("enter")
        await until(pilot, lambda: any(n.severity == "error" for n in app._notifications))
        assert any("not a session file" in n.message for n in app._notifications)
        assert sorted(fake._sessions) == ["alpha", "alpha-imported"]


@aio
async def test_new_rename_and_delete_with_confirmation():
    app, fake = app_with(FakeZKV(sessions=("alpha",)), session="alpha")  # as `zkv-mlx chat --session alpha`
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await until(pilot, lambda: app.backend.session_name == "alpha" and replies(app))
        assert replies(app)[0] == ("user", "Hello from alpha")
        await pilot.press("ctrl+n")
        await dialog(pilot, TextPromptScreen)
        await pilot.press(*"notes", "enter")
        await until(pilot, lambda: app.backend.session_name == "notes")

        await focus_session(pilot, "notes")
        await pilot.press("r")
        (await dialog(pilot, TextPromptScreen)).query_one("#text").value = "ideas"
        await pilot.press("enter")
        await until(pilot, lambda: app.backend.session_name == "ideas" and "ideas" in fake._sessions)

        await focus_session(pilot, "ideas")
        await pilot.press("d")
        await dialog(pilot, ConfirmScreen)
        await pilot.press("n")  # cancelled: nothing happens
        await pilot.pause()
        assert "ideas" in fake._sessions
        await pilot.press("d")
        await dialog(pilot, ConfirmScreen)
        await pilot.press("y")
        await until(pilot, lambda: "ideas" not in fake._sessions and app.backend.session_name is None)


@aio
async def test_without_sessions_api_the_sidebar_says_so():
    app, fake = app_with(FakeZKV(features={"usage"}))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        sidebar = app.query_one(SessionsSidebar)
        assert sidebar.query_one("#notice").display
        assert any(n.title == "Sessions unavailable" for n in app._notifications)
        assert not [b for b in app.active_bindings.values() if b.binding.action == "new_session"]
        await focus_session(pilot, None)
        assert "session('new')" not in [b.binding.action for b in app.active_bindings.values()]
        await pilot.press("n")  # hidden action: no dialog
        await pilot.pause()
        assert not isinstance(app.screen, TextPromptScreen)
        await send(pilot, "still works")
        assert replies(app)[-1][0] == "assistant"
        panel = app.query_one(CachePanel)
        await until(pilot, lambda: panel.updates > 0)
        assert not panel.stats.states()[1]  # block map estimated from the counts
        assert "not reported" in text_of(panel.query_one("#prefix-note"))


# -- cache panel, help, palette -----------------------------------------------------------------------


@aio
async def test_help_palette_and_panel_toggles():
    app, _ = app_with(FakeZKV(sessions=("alpha",)))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("f2")
        assert not app.query_one(SessionsSidebar).display
        await pilot.press("f2")
        assert app.query_one(SessionsSidebar).display

        titles = [c.title for c in app.get_system_commands(app.screen)]
        for title in ("Toggle cache panel", "Toggle sessions sidebar", "Session: new", "Session: import",
                      "Help: keys and panels", "Clear conversation"):
            assert title in titles
        await pilot.press("ctrl+p")
        await pilot.press(*"cachep")  # fuzzy: only "Toggle cache panel" matches
        await pilot.pause(0.3)
        await pilot.press("enter")
        await until(pilot, lambda: not app.query_one(CachePanel).display)
        await pilot.press("f3")
        assert app.query_one(CachePanel).display


# -- pieces -------------------------------------------------------------------------------------------


def test_metrics_summary_and_block_cells():
    m = TurnMetrics(prompt_tokens=120, completion_tokens=11, cached_tokens=64, ttft_s=0.2, total_s=1.2)
    assert m.summary() == "TTFT 0.20 s · 10.0 tok/s · 11 tokens · prefix hit 64/120"
    assert TurnMetrics().summary() == "no metrics"
    grid, per = cells(["used"] * 5 + ["free"] * 3 + ["cached"] * 4, 3)
    assert (grid, per) == (["used", "used", "cached"], 4)
    est, exact = CacheStats({"blocks_total": 10, "blocks_used": 3, "blocks_cached": 2}).states()
    assert est == ["used"] * 3 + ["cached"] * 2 + ["free"] * 5 and not exact


def test_backend_detects_missing_apis_on_the_real_api_class():
    from zkv_mlx.api import ZKV

    b = Backend(ZKV.__new__(ZKV))  # the class as shipped, without loading a model
    names = ("create_session", "list_sessions", "delete_session", "import_session", "load_session")
    assert b.caps.sessions == all(callable(getattr(ZKV, n, None)) for n in names)
    assert b.caps.block_map == callable(getattr(ZKV, "kv_block_map", None))
    assert b.caps.rename == callable(getattr(ZKV, "rename_session", None))


# -- `zkv-mlx chat` dispatch ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv, tty, expect", [
    (["chat"], True, "tui"),
    (["chat", "--plain"], True, "plain"),
    (["chat"], False, "plain"),
])
def test_chat_command_picks_tui_or_plain(monkeypatch, argv, tty, expect):
    import zkv_mlx.app
    import zkv_mlx.chat_cli
    from zkv_mlx import cli

    called = []
    monkeypatch.setattr(zkv_mlx.chat_cli, "run_chat", lambda args: called.append("plain") or 0)
    monkeypatch.setattr(zkv_mlx.app, "run_tui", lambda factory, **kw: called.append("tui") or 0)
    monkeypatch.setattr("sys.stdin.isatty", lambda: tty, raising=False)
    monkeypatch.setattr("sys.stdout.isatty", lambda: tty, raising=False)
    assert cli.main(argv) == 0
    assert called == [expect]
