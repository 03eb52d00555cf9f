"""Snapshot tests of the chat TUI with the fake engine at a fixed terminal size.

The SVGs live in tests/snapshots/test_tui_snapshots/. After an intended UI change, look at the report pytest
prints a path to, then refresh them with `pytest tests/test_tui_snapshots.py --snapshot-update`.
"""

import asyncio
import time
from pathlib import Path

import pytest

pytest.importorskip("pytest_textual_snapshot")

from pytest_textual_snapshot import SVGImageExtension  # noqa: E402

from zkv_mlx.app import make_app  # noqa: E402
from zkv_mlx.app.fake import FakeZKV  # noqa: E402
from zkv_mlx.app.loading_screen import LoadingScreen  # noqa: E402
from zkv_mlx.app.sessions_sidebar import SessionItem, SessionsSidebar  # noqa: E402

SIZE = (120, 36)
SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.fixture(autouse=True)
def _snapshots_under_tests_snapshots(monkeypatch):
    # syrupy's default is tests/__snapshots__/; this project keeps them in tests/snapshots/.
    monkeypatch.setattr(SVGImageExtension, "dirname",
                        classmethod(lambda cls, *, test_location: str(SNAPSHOTS / test_location.basename)))


async def until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.02)


async def ready(pilot) -> None:
    app = pilot.app
    await until(lambda: app.backend is not None and not isinstance(app.screen, LoadingScreen))
    await until(lambda: app.query_one(SessionsSidebar).query(SessionItem))
    for widget in app.query("Input, TextArea"):
        widget.cursor_blink = False  # a blinking cursor would make screenshots differ


async def chat(pilot, text: str) -> None:
    app = pilot.app
    prompt = app.query_one("#prompt")
    prompt.focus()
    prompt.value = text
    await pilot.press("enter")
    await until(lambda: app.turn is None and app.reply is None)
    await pilot.pause()


def test_main_screen_after_a_reply(snap_compare):
    app = make_app(lambda: FakeZKV(sessions=("notes",)), stats_interval=0)

    async def run_before(pilot):
        await ready(pilot)
        await chat(pilot, "What is a KV cache?")

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_sessions_sidebar(snap_compare):
    app = make_app(lambda: FakeZKV(sessions=("alpha", "beta", "gamma")), stats_interval=0)

    async def run_before(pilot):
        await ready(pilot)
        app.session_action("switch", "beta")
        await until(lambda: app.conversation and app.query_one(SessionsSidebar).current == "beta")
        lv = app.query_one(SessionsSidebar).query_one("ListView")
        # Under load a late sidebar refresh (after the switch) can reset the highlight: settle, then re-check.
        for _ in range(5):
            lv.focus()
            lv.index = 3  # gamma highlighted, beta open
            await pilot.pause(0.2)
            await pilot.wait_for_scheduled_animations()
            if lv.index == 3 and app.focused is lv:
                break
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_cache_panel_after_prefix_hits(snap_compare):
    app = make_app(lambda: FakeZKV(), stats_interval=0)

    async def run_before(pilot):
        await ready(pilot)
        await chat(pilot, "Explain paged attention")
        await chat(pilot, "And prefix caching?")
        panel = app.query_one("#cache")
        await until(lambda: panel.stats is not None and panel.stats.get("hit_tokens"))
        await pilot.press("f2")  # hide the sidebar: chat and cache panel only

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_multi_line_message_at_80x24(snap_compare):
    # Issue #22: a pasted multi-line message is sent whole and shown with its lines; 80 columns hide the cache.
    from textual import events

    app = make_app(lambda: FakeZKV(sessions=("notes",)), stats_interval=0)

    async def run_before(pilot):
        await ready(pilot)
        app.query_one("#prompt").focus()
        app.post_message(events.Paste("Summarise this:\r\n- paged KV\r\n- prefix cache"))
        await until(lambda: app.query_one("#prompt").text.count("\n") == 2)
        await pilot.press("enter")
        await until(lambda: app.turn is None and app.reply is None and app.conversation)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_live_resize_to_30x8(snap_compare):
    # Issue #22: shrinking a running app hides both panels; the chat and the message box keep the room.
    app = make_app(lambda: FakeZKV(sessions=("notes",)), stats_interval=0)

    async def run_before(pilot):
        await ready(pilot)
        await chat(pilot, "hi")
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.2)
        await pilot.resize_terminal(30, 8)
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=(120, 36), run_before=run_before)
