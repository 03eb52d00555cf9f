"""The conversation: user and assistant messages, replies streamed as Markdown with a metrics line under each."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import events
from textual.message import Message
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Markdown, Static

from .turn import TurnMetrics

EMPTY_HINT = "Ask anything. **Enter** sends, **Esc** stops a reply, **F1** shows the keys."


class ChatMessage(Vertical):
    """One message; an assistant reply can be streamed into it."""

    DEFAULT_CSS = """
    ChatMessage { height: auto; margin: 0 1 1 0; padding: 0 1; }
    ChatMessage.user { background: $boost; border-left: thick $secondary; }
    ChatMessage.assistant { border-left: thick $primary; }
    ChatMessage.note { color: $text-muted; }
    ChatMessage .role { color: $text-muted; text-style: bold; }
    ChatMessage Markdown { margin: 0; padding: 0; background: transparent; }
    ChatMessage .metrics { color: $text-muted; display: none; }
    ChatMessage.failed { border-left: thick $error; color: $text-muted; }
    ChatMessage.failed .metrics { color: $error; }
    """

    def __init__(self, role: str, text: str = ""):
        super().__init__(classes=role)
        self.role = role
        self.text = text
        self._stream = None

    def compose(self):
        yield Static({"user": "you", "note": "note"}.get(self.role, self.role), classes="role")
        # What the user typed is shown as typed; replies (and notes) are Markdown.
        yield Static(Text(self.text), classes="body") if self.role == "user" else Markdown(self.text)
        yield Static("", classes="metrics")

    async def write(self, chunk: str) -> None:
        """Appends streamed text."""
        if self._stream is None:
            self._stream = Markdown.get_stream(self.query_one(Markdown))
        self.text += chunk
        await self._stream.write(chunk)

    async def finish(self, metrics: TurnMetrics | None, stopped: bool = False) -> None:
        """Ends the stream and shows the metrics line."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        line = metrics.summary() if metrics is not None else ""
        if stopped:
            line = f"stopped · {line}" if line else "stopped"
        metrics_line = self.query_one(".metrics", Static)
        metrics_line.update(Text(line))
        metrics_line.display = bool(line)


    def mark_failed(self, error: str) -> None:
        """Marks a user message the engine did not answer (it is not part of the conversation)."""
        self.add_class("failed")
        self.query_one(".role", Static).update("you · not sent")
        line = self.query_one(".metrics", Static)
        line.update(Text(f"not sent: {error}"))
        line.display = True


class ChatView(VerticalScroll):
    """Scrolls with the conversation; stays pinned to the bottom while a reply streams."""

    DEFAULT_CSS = """
    ChatView { height: 1fr; padding: 0 0 0 1; }
    ChatView #empty { color: $text-muted; margin: 1 2; }
    """

    @dataclass
    class Typed(Message):
        """Text was typed or pasted while the chat had focus: the app moves it to the message box."""

        character: str

    def compose(self):
        yield Markdown(EMPTY_HINT, id="empty")

    def on_key(self, event: events.Key) -> None:
        # The chat cannot take text; without this, keys typed here would vanish without a trace.
        if event.is_printable and event.character:
            event.stop()
            event.prevent_default()
            self.post_message(self.Typed(event.character))

    def on_paste(self, event: events.Paste) -> None:
        event.stop()
        if event.text:
            self.post_message(self.Typed(event.text))

    def follow(self) -> None:
        # Anchoring keeps the view at the bottom as replies grow (until the user scrolls up). Only anchor
        # once the content overflows: an anchored view of short content would sit at the bottom of the panel.
        if self.max_scroll_y > 0 and not self.is_anchored:
            self.anchor()

    async def clear(self) -> None:
        self.anchor(False)
        await self.remove_children()
        await self.mount(Markdown(EMPTY_HINT, id="empty"))

    async def add(self, role: str, text: str = "") -> ChatMessage:
        for hint in self.query("#empty"):
            await hint.remove()
        msg = ChatMessage(role, text)
        await self.mount(msg)
        if self.is_anchored:
            self.anchor()  # a new message brings the view back to the bottom
        self.call_after_refresh(self.follow)
        return msg

    async def load(self, messages: list[dict]) -> None:
        """Shows a stored conversation (system messages are not shown)."""
        await self.clear()
        for m in messages:
            if m["role"] != "system":
                await self.add(m["role"], m["content"])

    async def append_to(self, msg: ChatMessage, chunk: str) -> None:
        await msg.write(chunk)
        self.call_after_refresh(self.follow)
