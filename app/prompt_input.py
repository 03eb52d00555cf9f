"""The message box: a multi-line TextArea where Enter sends, pastes stay whole and Up/Down walk the history."""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

PLACEHOLDER = "Message · Enter sends · Ctrl+J new line"


def normalize_newlines(text: str) -> str:
    """Terminals paste line ends as CR (tmux) or CRLF (Windows text); the model should see plain LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


class PromptInput(TextArea):
    """Multi-line prompt with history.

    Enter posts `PromptInput.Submitted`; Ctrl+J (and Shift+Enter / Alt+Enter where the terminal reports them)
    insert a new line. A bracketed paste of several lines is inserted whole. Up on the first line and Down on the
    last line walk through what was sent before, like a shell.
    """

    DEFAULT_CSS = """
    PromptInput { height: auto; min-height: 3; max-height: 8; min-width: 12; border: tall $border-blurred; padding: 0 1; }
    PromptInput:focus { border: tall $border; }
    """

    BINDINGS = [
        Binding("ctrl+j,shift+enter,alt+enter", "newline", "New line", show=False),
    ]

    @dataclass
    class Submitted(Message):
        """Enter was pressed; `value` is the whole text (new lines included)."""

        input: "PromptInput"
        value: str

        @property
        def control(self) -> "PromptInput":
            return self.input

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, tab_behavior="focus", show_line_numbers=False,
                         highlight_cursor_line=False, placeholder=PLACEHOLDER, **kwargs)
        self.sent: list[str] = []
        self._pos = 0  # index into history; len(history) = the draft being typed
        self._draft = ""

    @property
    def value(self) -> str:
        """The text in the box (an alias of `text`, so code written for an Input keeps working)."""
        return self.text

    @value.setter
    def value(self, text: str) -> None:
        self.load_text(text)
        self.move_cursor(self.document.end)

    def remember(self, text: str) -> None:
        """Adds a sent message to the history (consecutive duplicates once)."""
        if text and (not self.sent or self.sent[-1] != text):
            self.sent.append(text)
        self._pos = len(self.sent)
        self._draft = ""

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        await super()._on_key(event)

    # Up/Down move the cursor inside a multi-line message; past its first/last line they walk the history.
    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self.cursor_location[0] == 0 and self.sent:
            self.action_history(-1)
        else:
            super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        last = self.cursor_location[0] == self.document.line_count - 1
        if not select and last and self._pos < len(self.sent):
            self.action_history(1)
        else:
            super().action_cursor_down(select)

    async def _on_paste(self, event: events.Paste) -> None:
        event.stop()
        event.prevent_default()
        if self.read_only or not event.text:
            return
        result = self.replace(normalize_newlines(event.text), *self.selection)
        self.move_cursor(result.end_location)
        self.focus()

    def action_newline(self) -> None:
        self.replace("\n", *self.selection)

    def action_history(self, step: int) -> None:
        if not self.sent:
            return
        if self._pos == len(self.sent):
            self._draft = self.text
        self._pos = max(0, min(len(self.sent), self._pos + step))
        self.value = self._draft if self._pos == len(self.sent) else self.sent[self._pos]
