"""Pilot tests of the chat TUI in small and resized terminals (issue #22), against the fake engine.

Each test names the terminal size it runs at; `screen_lines` reads what the terminal would show.
"""

import json
import re
import threading

from textual import events

from test_tui import aio, app_with, dialog, focus_session, loaded, replies, send, text_of, until
from zkv_mlx.app.chat_app import AUTO_HIDE, ZkvChatApp
from zkv_mlx.app.chat_view import ChatMessage, ChatView
from zkv_mlx.app.confirm_screen import ConfirmScreen
from zkv_mlx.app.fake import ALL_FEATURES, FakeZKV, reply_for
from zkv_mlx.app.file_dialog import FileDialog
from zkv_mlx.app.help_screen import HelpScreen, KEYS
from zkv_mlx.app.prompt_input import PromptInput
from zkv_mlx.app.sessions_sidebar import TIERS, SessionItem, SessionsSidebar, tier_label
from zkv_mlx.errors import PromptTooLong


def screen_lines(app) -> list[str]:
    """The terminal's rows as plain text (the active screen, dialogs included)."""
    return [strip.text for strip in app.screen._compositor.render_strips()]


def dialog_text(app) -> str:
    """The text inside the dialog box on screen, joined across the rows it wraps over, without whitespace
    (a long path wraps inside a word)."""
    box = app.screen.query_one("Vertical").region
    rows = screen_lines(app)[box.y:box.bottom]
    return re.sub(r"\s+", "", "".join(row[box.x:box.right].strip(" █▀▄▔▁▎▊") for row in rows))


def squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)


def fully_visible(app, widget) -> bool:
    region = widget.region
    return widget.display and region.area > 0 and app.screen.region.contains_region(region)


# -- bracketed paste and the multi-line message box -------------------------------------------------


@aio
async def test_bracketed_paste_of_several_lines_reaches_the_model_whole():
    app, fake = app_with()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        prompt = app.query_one(PromptInput)
        prompt.focus()
        # What a terminal sends for a bracketed paste: the lines end in CR (tmux) or CRLF.
        app.post_message(events.Paste("first line\r\nsecond line\rthird line"))
        await until(pilot, lambda: prompt.text.count("\n") == 2)
        assert prompt.text == "first line\nsecond line\nthird line"
        await pilot.press("enter")
        await until(pilot, lambda: app.turn is None and app.reply is None)
        await pilot.pause()
        whole = "first line\nsecond line\nthird line"
        # The model got all three lines: its canned reply quotes the last user message it was given.
        assert list(fake.tokenizer.rendered.values())[-1][-1] == {"role": "user", "content": whole}
        assert replies(app) == [("user", whole), ("assistant", reply_for([{"role": "user", "content": whole}]))]
        assert prompt.text == ""

        # Ctrl+J types a new line; Enter sends both lines; Up brings the two-line message back.
        await pilot.press("a", "ctrl+j", "b")
        assert prompt.text == "a\nb"
        await pilot.press("enter")
        await until(pilot, lambda: app.turn is None and app.reply is None)
        assert app.conversation[-2] == {"role": "user", "content": "a\nb"}
        await pilot.press("up")
        assert prompt.text == "a\nb"
        await pilot.press("up")  # the cursor is on the last line: Up first moves inside the message
        assert prompt.text == "a\nb" and prompt.cursor_location[0] == 0
        await pilot.press("up")
        assert prompt.text == whole


# -- live resize --------------------------------------------------------------------------------------


@aio
async def test_live_resize_120x36_to_80x24_to_30x8_hides_panels_and_keeps_the_message_box():
    app, _ = app_with(FakeZKV(sessions=("alpha",)))
    async with app.run_test(size=(120, 36)) as pilot:
        await loaded(pilot)
        await send(pilot, "hello")
        sidebar, cache = app.query_one(SessionsSidebar), app.query_one("#cache")
        chat, prompt = app.query_one(ChatView), app.query_one(PromptInput)
        assert sidebar.display and cache.display
        await focus_session(pilot, "alpha")  # focus in the sidebar, which is about to go

        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.2)
        assert sidebar.display and not cache.display  # 80 >= 80 columns, < 110
        assert chat.size.width >= 40 and fully_visible(app, prompt) and prompt.size.height >= 1

        await pilot.resize_terminal(30, 8)
        await pilot.pause(0.2)
        assert not sidebar.display and not cache.display
        assert chat.size.width >= 28 and chat.size.height >= 1
        assert fully_visible(app, prompt)
        assert app.focused is prompt  # focus left the hidden sidebar for the message box
        assert any("Message" in line for line in screen_lines(app))  # the box's placeholder is on screen
        await pilot.press(*"ok")
        assert prompt.text == "ok"

        # Wide again: what the rule hid comes back.
        await pilot.resize_terminal(120, 36)
        await pilot.pause(0.2)
        assert sidebar.display and cache.display

        # A panel the user showed with F3 at 80 columns stays; becoming narrower than its limit hides it again.
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.2)
        await pilot.press("f3")
        assert cache.display
        await pilot.resize_terminal(100, 24)
        await pilot.pause(0.2)
        assert cache.display
        await pilot.resize_terminal(120, 36)
        await pilot.pause(0.2)
        await pilot.resize_terminal(100, 24)
        await pilot.pause(0.2)
        assert not cache.display and sidebar.display
    assert AUTO_HIDE == {"#cache": 110, "#sessions": 80}  # the limits docs/tui.md states


@aio
async def test_narrow_start_applies_the_same_rule():
    app, _ = app_with()
    async with app.run_test(size=(79, 24)) as pilot:
        await loaded(pilot)
        assert not app.query_one(SessionsSidebar).display and not app.query_one("#cache").display


# -- export: overwrite and during a reply -------------------------------------------------------------


@aio
async def test_export_onto_an_existing_file_asks_before_overwriting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app, fake = app_with(FakeZKV(sessions=("alpha",)))
    path = tmp_path / "alpha.zkvs"
    path.write_text("the old file")
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await focus_session(pilot, "alpha")
        await pilot.press("e")
        (await dialog(pilot, FileDialog)).query_one("#path").value = str(path)
        await pilot.press("enter")
        await dialog(pilot, ConfirmScreen)
        assert squeezed(f"{path} already exists. Replace it?") in dialog_text(app)
        await pilot.press("n")  # keep it: back in the file dialog, nothing written
        await until(pilot, lambda: isinstance(app.screen, FileDialog))
        assert path.read_text() == "the old file"
        await pilot.press("enter")
        await dialog(pilot, ConfirmScreen)
        await pilot.press("y")
        await until(pilot, lambda: path.read_text() != "the old file")
        assert json.loads(path.read_text())["name"] == "alpha"


@aio
async def test_export_during_a_reply_exports_the_state_after_the_reply(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hold = threading.Event()
    app, fake = app_with(FakeZKV(sessions=("alpha",), hold=hold), session="alpha")
    path = tmp_path / "during.zkvs"
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await until(pilot, lambda: app.backend.session_name == "alpha" and replies(app))
        prompt = app.query_one(PromptInput)
        prompt.focus()
        prompt.value = "what now"
        await pilot.press("enter")
        await until(pilot, lambda: app.reply is not None and app.reply.text)  # the reply is under way
        app.session_action("export", "alpha")
        (await dialog(pilot, FileDialog)).query_one("#path").value = str(path)
        await pilot.press("enter")
        await until(pilot, lambda: any("when the reply ends" in n.message for n in app._notifications))
        await pilot.pause(0.2)
        assert not path.exists()  # nothing written from the state before the turn
        hold.set()
        await until(pilot, path.exists)
        messages = json.loads(path.read_text())["messages"]
        full = reply_for(messages[:-1])
        # The file holds what the chat shows once the reply has ended: the question and the whole reply.
        assert messages[-2:] == [{"role": "user", "content": "what now"}, {"role": "assistant", "content": full}]
        assert replies(app)[-1] == ("assistant", full)


# -- dialogs, status line and footer at 80 columns and less -------------------------------------------


@aio
async def test_dialogs_show_their_whole_question_at_80x24_and_40x12():
    app, _ = app_with(FakeZKV(sessions=("a-session-with-a-long-name",)))
    question = ("Delete session a-session-with-a-long-name? Its saved context is removed for good.")
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        for size in ((80, 24), (40, 12)):
            await pilot.resize_terminal(*size)
            await pilot.pause(0.2)
            app.session_action("delete", "a-session-with-a-long-name")
            await dialog(pilot, ConfirmScreen)
            await pilot.pause(0.2)
            assert squeezed(question) in dialog_text(app), (size, screen_lines(app))
            assert all(len(line) == size[0] for line in screen_lines(app))
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))


@aio
async def test_status_line_and_footer_fit_80_columns():
    hold = threading.Event()
    app, _ = app_with(FakeZKV(sessions=("alpha",), hold=hold))
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        long = "Smollm2 135M 8k Lc100K Mix1 Ep2 ready · 2052 KV blocks of 16 tokens, and some more words"
        app._status(long)
        await pilot.pause(0.2)
        status = app.query_one("#status")
        row = screen_lines(app)[status.region.y][status.region.x:status.region.right].rstrip()
        assert row.endswith("…") and long.startswith(row[:-1].strip())  # one line, cut visibly, not wrapped

        def footer_shows(*words) -> bool:
            footer = screen_lines(app)[-1]
            return all(re.search(rf"\b{w}\b", footer) for w in words) and "palette" in footer

        assert footer_shows("Quit", "Help", "Sessions", "Cache", "New", "Clear")
        await focus_session(pilot, "alpha")  # the sidebar's keys are on its own line, the footer still fits
        assert footer_shows("Quit", "Help", "Sessions", "Cache", "New", "Clear")
        assert "d delete" in text_of(app.query_one("#keys"))
        prompt = app.query_one(PromptInput)
        prompt.focus()
        prompt.value = "hi"
        await pilot.press("enter")
        await until(pilot, lambda: app.reply is not None and app.reply.text)
        await pilot.pause(0.2)
        assert footer_shows("Quit", "Help", "Sessions", "Cache", "New", "Clear", "Stop")
        hold.set()


# -- typing on the chat, failed messages --------------------------------------------------------------


@aio
async def test_typing_or_pasting_while_the_chat_has_focus_goes_to_the_message_box():
    app, _ = app_with()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        chat, prompt = app.query_one(ChatView), app.query_one(PromptInput)
        chat.focus()
        await pilot.pause()
        await pilot.press("h", "i")
        assert app.focused is prompt and prompt.text == "hi"
        chat.focus()
        await pilot.pause()
        app.post_message(events.Paste(" there\rfriend"))
        await until(pilot, lambda: prompt.text == "hi there\nfriend")
        assert app.focused is prompt


@aio
async def test_a_failed_message_is_marked_not_sent_and_not_resent():
    fake = FakeZKV(fail=PromptTooLong("the prompt has 9000 tokens, the context 8192; shorten it"))
    app, _ = app_with(fake)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await send(pilot, "a very long question")
        failed = app.query(ChatMessage).last()
        assert failed.role == "user" and failed.has_class("failed")
        assert text_of(failed.query_one(".role")) .strip() == "you · not sent"
        assert "not sent: the prompt has 9000 tokens" in text_of(failed.query_one(".metrics"))
        assert [m.role for m in app.query(ChatMessage)] == ["user"]  # no empty reply left behind
        assert app.query_one(PromptInput).text == "a very long question"  # back in the box to edit
        assert app.conversation == []
        fake.fail = None
        await send(pilot, "short")
        assert list(fake.tokenizer.rendered.values())[-1] == [{"role": "user", "content": "short"}]


# -- help and tiers -----------------------------------------------------------------------------------


@aio
async def test_help_lists_only_keys_the_app_has_and_the_sidebars_tier_names():
    app, _ = app_with(FakeZKV(sessions=("alpha",), features=ALL_FEATURES - {"rename"}))
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        text = app.screen.text
        assert "rename" not in text.lower()  # the engine has no rename_session()
        for tier in TIERS:
            assert f"`{tier}`" in text
        await pilot.press("escape")
        # Every key the help names is bound in the app (or in the message box).
        bound = {b.key for b in ZkvChatApp.BINDINGS} | {"ctrl+p", "tab", "enter", "up", "down"}
        bound |= set(PromptInput.BINDINGS[0].key.split(","))
        for key, _ in KEYS:
            for k in re.findall(r"(Ctrl\+\w|F\d|Esc|Enter|Tab|Up|Down)", key):
                k = k.lower().replace("esc", "escape")
                assert k in bound, key

        # A new session is "memory", as the help and docs/tui.md say (the API reports "none" for it).
        app.session_action("new")
        await pilot.press(*"fresh", "enter")
        await until(pilot, lambda: app.query_one(SessionsSidebar).current == "fresh")
        await pilot.pause()
        item = next(i for i in app.query(SessionItem) if i.session_name == "fresh")
        assert item.row.tier == "none"
        assert text_of(item.query_one(".detail")).strip().endswith("· memory")
        assert {tier_label(t) for t in ("memory", "ssd", "disk", "none")} == set(TIERS)


@aio
async def test_help_lists_rename_when_the_engine_has_it():
    app, _ = app_with(FakeZKV(sessions=("alpha",)))
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert "r rename" in app.screen.text


@aio
async def test_resize_from_tiny_back_to_wide_keeps_the_message_box():
    """30x8 -> 120x8 -> 30x8 -> 120x36: the panels come back only once the screen has its new width, so the
    message box is never squeezed to zero columns (Textual crashed wrapping its placeholder at width 0)."""
    app, _ = app_with(FakeZKV(sessions=("alpha",)))
    async with app.run_test(size=(120, 36)) as pilot:
        await loaded(pilot)
        prompt = app.query_one(PromptInput)
        for w, h in [(30, 8), (120, 8), (30, 8), (120, 36), (31, 9), (121, 37)]:
            await pilot.resize_terminal(w, h)
            await pilot.pause(0.2)
            assert app.is_running and app.return_code is None
            assert prompt.size.width >= 12 and fully_visible(app, prompt)
        assert app.query_one(SessionsSidebar).display and app.query_one("#cache").display
        await pilot.press(*"ok")
        assert prompt.text == "ok"


@aio
async def test_cache_figures_fit_inside_the_scrollbar_of_a_short_terminal():
    """At 120x8 the cache panel scrolls; its bars must fit beside the scrollbar (wrapped bars made the panel taller,
    which kept the scrollbar, and the wrapped layout, after the terminal grew again)."""
    app, _ = app_with(FakeZKV(sessions=("alpha",)))
    async with app.run_test(size=(120, 36)) as pilot:
        await loaded(pilot)
        await send(pilot, "hi")
        await pilot.pause(0.5)
        figures, cache = app.query_one("#figures"), app.query_one("#cache")
        tall = figures.size.height
        await pilot.resize_terminal(120, 8)
        await pilot.pause(0.3)
        await send(pilot, "again")
        await pilot.pause(0.5)
        assert cache.show_vertical_scrollbar and figures.size.height == tall  # no line wrapped
        await pilot.resize_terminal(120, 36)
        await pilot.pause(0.5)
        assert not cache.show_vertical_scrollbar and figures.size.height == tall
