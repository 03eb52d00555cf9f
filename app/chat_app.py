"""The Textual app behind `zkv-mlx chat`: layout, key bindings, and the workers that talk to the engine.

Every engine call runs in a `@work(thread=True)` worker; workers only post messages (messages.py) and the
handlers here update the widgets. Session dialogs and their workers live in session_actions.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from rich.text import Text
from textual import events, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from .backend import Backend, BackendClosed, describe
from .turn import Turn
from .cache_panel import CachePanel
from .chat_view import ChatMessage, ChatView
from .help_screen import HelpScreen
from .loading_screen import LoadingScreen
from .messages import (ModelFailed, ModelLoaded, ReplyChunk, SessionOpened, SessionsUpdated, StatsUpdated,
                       TurnDone, TurnFailed)
from .prompt_input import PromptInput, normalize_newlines
from .session_actions import SessionActions
from .sessions_sidebar import SessionsSidebar

# A panel is hidden when the terminal starts or becomes narrower than its width here (F2/F3 still show it); it
# comes back when the terminal is wide enough again, unless the user toggled it meanwhile.
AUTO_HIDE = {"#cache": 110, "#sessions": 80}
SHORT = 16  # below this many rows the header goes, so the chat and the message box keep their room

NO_TRANSCRIPT = ("*This session's earlier messages cannot be shown (the engine does not expose them); "
                 "the model still has the whole conversation in its context.*")


class ZkvChatApp(SessionActions, App[int]):
    """Chat with a model, manage sessions and watch the KV cache.

    Args:
        model_factory: builds the model (a ZKV, or anything with its methods); called in a worker thread.
        what: how to name the model while it loads.
        user: user id for requests and sessions.
        session: open (or create) this session once loaded.
        system: system prompt for new conversations.
        sampling: sampling options for every reply.
        stats_interval: seconds between cache panel refreshes (0: only after turns).
    """

    TITLE = "zkv-mlx"
    CSS = """
    #body { height: 1fr; }
    #main { width: 1fr; min-width: 24; }
    #status { height: 1; color: $text-muted; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    """
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("escape", "stop", "Stop"),
        Binding("f1", "help", "Help"),
        Binding("f2", "toggle('#sessions')", "Sessions"),
        Binding("f3", "toggle('#cache')", "Cache"),
        Binding("ctrl+n", "new_session", "New"),
        Binding("ctrl+l", "clear", "Clear"),
    ]

    def __init__(self, model_factory: Callable[[], object], *, what: str = "the model", user: str | None = None,
                 session: str | None = None, system: str | None = None, sampling: dict | None = None,
                 stats_interval: float = 1.0):
        super().__init__()
        self.model_factory, self.what, self.user = model_factory, what, user
        self.start_session, self.system, self.sampling = session, system, sampling or {}
        self.stats_interval = stats_interval
        self.backend: Backend | None = None
        self.load_error: str | None = None
        self.conversation: list[dict] = []  # what the chat view shows (and, without a session, what is sent)
        self.transcripts: dict[str | None, list[dict]] = {}  # per session, for engines without session.messages
        self.turn: Turn | None = None
        self.reply: ChatMessage | None = None
        self._sent: list[dict] = []
        self._sent_view: ChatMessage | None = None  # the user message of the turn in progress
        self._stats_busy = False
        self._closing = False
        self._auto_hidden: set[str] = set()  # panels hidden because the terminal was too narrow
        self._width: int | None = None  # terminal width at the last layout fit
        self._pending_export: tuple[str, str] | None = None  # (session, path) to export when the reply ends

    def compose(self):
        yield Header()
        with Horizontal(id="body"):
            yield SessionsSidebar(id="sessions")
            with Vertical(id="main"):
                yield ChatView(id="chat")
                yield Static("", id="status")
                yield PromptInput(id="prompt")
            yield CachePanel(id="cache")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self._fit_to(self.size.width, self.size.height)
        self.push_screen(LoadingScreen(self.what))
        self.load_model()
        if self.stats_interval > 0:
            self.set_interval(self.stats_interval, self._poll_stats)

    def on_unmount(self) -> None:
        self._closing = True
        if self.turn is not None:
            self.turn.cancel()
        if self.backend is not None:
            self.backend.close()

    def on_resize(self, event: events.Resize) -> None:
        # After the screen has taken the new size: showing a panel while the layout still has the old, narrow
        # width would squeeze the message box to nothing.
        self.call_after_refresh(self._fit_to, event.size.width, event.size.height)

    def _fit_to(self, width: int, height: int) -> None:
        """Applies the narrow-terminal rule (AUTO_HIDE, SHORT) to the main screen's panels."""
        main = self.screen_stack[0] if self.screen_stack else self.screen
        was, self._width = self._width, width
        for selector, min_width in AUTO_HIDE.items():
            panel = main.query_one(selector)
            if width < min_width and panel.display and (was is None or was >= min_width):
                panel.display = False
                self._auto_hidden.add(selector)
            elif width >= min_width and selector in self._auto_hidden:
                panel.display = True
                self._auto_hidden.discard(selector)
        main.query_one(Header).display = height >= SHORT
        focused = self.focused
        if focused is not None and not all(getattr(n, "display", True) for n in (focused, *focused.ancestors)):
            main.query_one(PromptInput).focus()  # focus must not stay in a panel that was just hidden

    # -- loading --------------------------------------------------------------------------------------
    @work(thread=True, group="load")
    def load_model(self) -> None:
        try:
            backend = Backend(self.model_factory(), user=self.user, sampling=self.sampling)
        except Exception as e:  # a bad path, an unsupported model, no memory: shown, never a crash
            self.post_message(ModelFailed(describe(e)))
            return
        if self._closing:  # quit while loading
            backend.close()
            return
        self.post_message(ModelLoaded(backend))

    async def on_model_loaded(self, msg: ModelLoaded) -> None:
        self.backend = b = msg.backend
        if isinstance(self.screen, LoadingScreen):
            self.pop_screen()
        info = b.info
        self.sub_title = info.get("model", "")
        self._status(f"{info.get('model', 'model')} ready · {info.get('kv_blocks', '?')} KV blocks of "
                     f"{info.get('block_size', '?')} tokens")
        self.query_one(SessionsSidebar).set_capabilities(b.caps.sessions, b.caps.rename)
        if not b.caps.sessions:
            self.notify("This engine build has no sessions API: the chat is kept in memory only.",
                        title="Sessions unavailable", severity="warning")
            if self.start_session:
                self.notify(f"--session {self.start_session} ignored (no sessions API)", severity="warning")
        self.refresh_bindings()
        self.query_one(PromptInput).focus()
        if b.caps.sessions and self.start_session:
            self.open_start_session(self.start_session)
        else:
            self.refresh_sessions()
        self.refresh_stats()

    def on_model_failed(self, msg: ModelFailed) -> None:
        self.load_error = msg.error
        if isinstance(self.screen, LoadingScreen):
            self.screen.show_error(msg.error)
        self.notify(msg.error, title="Could not load the model", severity="error", timeout=30)

    # -- chatting -------------------------------------------------------------------------------------
    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        if not text:
            return
        if self.backend is None:
            self.notify("The model is still loading.", severity="warning")
            return
        if self.turn is not None:
            self.notify("A reply is being generated: wait for it or press Esc.", severity="warning")
            return
        event.input.remember(text)
        event.input.value = ""
        new = [{"role": "user", "content": text}]
        if self.system and not self.conversation:
            new.insert(0, {"role": "system", "content": self.system})
        self.conversation += new
        self._sent = new
        chat = self.query_one(ChatView)
        self._sent_view = await chat.add("user", text)
        self.reply = await chat.add("assistant")
        self.turn = self.backend.turn(list(self.conversation), new)
        self._status("Generating… (Esc stops)")
        self.refresh_bindings()
        self.run_turn(self.turn)

    @work(thread=True, group="turn")
    def run_turn(self, turn: Turn) -> None:
        try:
            for chunk in turn:
                self.post_message(ReplyChunk(chunk))
        except BackendClosed:
            return
        except Exception as e:
            self.post_message(TurnFailed(describe(e)))
        else:
            self.post_message(TurnDone(turn.metrics, turn.stopped))
        self._post_stats()
        self._post_sessions()

    async def on_reply_chunk(self, msg: ReplyChunk) -> None:
        if self._gone():
            return
        if self.reply is not None:
            await self.query_one(ChatView).append_to(self.reply, msg.text)

    async def on_turn_done(self, msg: TurnDone) -> None:
        if self._gone():
            return
        reply, self.reply, self.turn, self._sent_view = self.reply, None, None, None
        if reply is not None:
            await reply.finish(msg.metrics, msg.stopped)
            chat = self.query_one(ChatView)
            chat.call_after_refresh(chat.follow)
            if reply.text:
                self.conversation.append({"role": "assistant", "content": reply.text})
        self.transcripts[self._session_name()] = self.conversation
        self._status("Stopped" if msg.stopped else "Ready")
        self.refresh_bindings()
        self.run_pending_export()

    async def on_turn_failed(self, msg: TurnFailed) -> None:
        if self._gone():
            return
        reply, self.reply, self.turn = self.reply, None, None
        if reply is not None:
            await reply.finish(None)
            await reply.remove()
        # The failed message was not answered: leave it out of what is sent next time.
        for m in self._sent:
            if self.conversation and self.conversation[-1] is m:
                self.conversation.pop()
        sent, self._sent_view = self._sent_view, None
        if sent is not None:
            sent.mark_failed(msg.error)
            prompt = self.query_one(PromptInput)
            if not prompt.text.strip():
                prompt.value = sent.text  # back in the box, to shorten or send again
        self.notify(msg.error, title="Generation failed", severity="error", timeout=15)
        self._status("Generation failed")
        self.refresh_bindings()
        self.run_pending_export()

    def on_chat_view_typed(self, msg: ChatView.Typed) -> None:
        prompt = self.query_one(PromptInput)
        prompt.focus()
        prompt.insert(normalize_newlines(msg.character))

    def action_stop(self) -> None:
        if self.turn is not None:
            self.turn.cancel()
            self._status("Stopping…")

    async def action_clear(self) -> None:
        if self.turn is not None:
            self.notify("Stop the reply first (Esc).", severity="warning")
            return
        self.conversation = []
        self.transcripts[self._session_name()] = self.conversation
        await self.query_one(ChatView).clear()
        if self.backend is not None and self.backend.session is not None:
            self.run_session_op("clear", self.backend.clear_session)

    # -- statistics -----------------------------------------------------------------------------------
    def _poll_stats(self) -> None:
        if self.query_one(CachePanel).display and not self.screen.is_modal:
            self.refresh_stats()

    @work(thread=True, group="stats")
    def refresh_stats(self) -> None:
        if self.backend is None or self._stats_busy:
            return
        self._post_stats()

    def _post_stats(self) -> None:
        self._stats_busy = True
        try:
            self.post_message(StatsUpdated(self.backend.stats()))
        except BackendClosed:
            pass
        except Exception as e:
            self.call_from_thread(self.notify, describe(e), title="Cache statistics", severity="error")
        finally:
            self._stats_busy = False

    def on_stats_updated(self, msg: StatsUpdated) -> None:
        if not self._gone():
            self.query_one(CachePanel).show(msg.stats)

    # -- sessions list (the dialogs are in SessionActions) ----------------------------------------------
    async def on_sessions_updated(self, msg: SessionsUpdated) -> None:
        if not self._gone():
            await self.query_one(SessionsSidebar).show(msg.rows, msg.current)

    async def on_session_opened(self, msg: SessionOpened) -> None:
        if self._gone():
            return
        chat = self.query_one(ChatView)
        stored = msg.messages if msg.messages is not None else self.transcripts.get(msg.name)
        self.conversation = list(stored or [])
        self.transcripts[msg.name] = self.conversation
        await chat.load(self.conversation)
        if stored is None and msg.name is not None:
            await chat.add("note", NO_TRANSCRIPT)
        model = self.backend.info.get("model", "") if self.backend else ""
        self.sub_title = f"{model} · {msg.name}" if msg.name else model
        self._status(f"Session {msg.name}" if msg.name else "Unsaved chat")
        self.query_one(PromptInput).focus()

    # -- panels, help, palette ------------------------------------------------------------------------
    def action_toggle(self, selector: str) -> None:
        self._auto_hidden.discard(selector)  # the user's choice holds (until the terminal shrinks past the limit again)
        panel = self.query_one(selector)
        panel.display = not panel.display
        if panel.display and selector == "#cache":
            self.refresh_stats()
        if not panel.display and self.focused is not None and panel in self.focused.ancestors:
            self.query_one(PromptInput).focus()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            caps = self.backend.caps if self.backend is not None else None
            self.push_screen(HelpScreen(sessions=caps is None or caps.sessions, rename=bool(caps and caps.rename)))

    def action_quit(self) -> None:
        if self.turn is not None:
            self.turn.cancel()
        code = 1 if self.load_error else 0
        self.exit(code, return_code=code)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "stop":
            return self.turn is not None
        if action in ("new_session", "clear") and self.backend is None:
            return None
        if action == "new_session":
            return self.backend.caps.sessions
        return True

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help: keys and panels", "Show the help screen (F1)", self.action_help)
        yield SystemCommand("Toggle sessions sidebar", "Show or hide the sessions (F2)",
                            lambda: self.action_toggle("#sessions"))
        yield SystemCommand("Toggle cache panel", "Show or hide the KV cache panel (F3)",
                            lambda: self.action_toggle("#cache"))
        yield SystemCommand("Clear conversation", "Forget this conversation (Ctrl+L)", self.action_clear)
        yield SystemCommand("Refresh cache statistics", "Read kv_cache_stats() now", self.refresh_stats)
        if self.turn is not None:
            yield SystemCommand("Stop generating", "Stop the reply (Esc)", self.action_stop)
        yield from self.session_commands()

    # -- helpers --------------------------------------------------------------------------------------
    def _gone(self) -> bool:
        """Whether the main screen is torn down (the app is quitting): a worker's late message is dropped then."""
        return not self.screen_stack or not self.screen_stack[0].query(ChatView)

    def _status(self, text: str) -> None:
        self.query_one("#status", Static).update(Text(text))

    def _session_name(self) -> str | None:
        return self.backend.session_name if self.backend is not None else None
