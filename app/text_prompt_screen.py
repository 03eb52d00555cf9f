"""Asks for one line of text (a session name) in a modal dialog: Enter accepts, Esc cancels."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label


class TextPromptScreen(ModalScreen[str | None]):
    """Dismisses with the text entered (stripped; may be empty) or None when cancelled."""

    DEFAULT_CSS = """
    TextPromptScreen { align: center middle; }
    TextPromptScreen > Vertical { width: 64; max-width: 100%; height: auto; border: thick $primary;
                                  background: $surface;                                  padding: 1 2; }
    TextPromptScreen .hint { color: $text-muted; }
    TextPromptScreen Label { width: 100%; }  /* wraps at word ends inside the dialog instead of being cut */
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str = "", hint: str = "Enter to accept, Esc to cancel"):
        super().__init__()
        self.title_text, self.value, self.hint = title, value, hint

    def compose(self):
        with Vertical():
            yield Label(self.title_text)
            yield Input(self.value, id="text")
            yield Label(self.hint, classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value.strip())

    def action_cancel(self) -> None:
        self.dismiss(None)
