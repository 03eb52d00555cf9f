"""The message box: an Input that remembers what was sent (Up/Down walk the history, like a shell)."""

from __future__ import annotations

from textual.binding import Binding
from textual.widgets import Input


class PromptInput(Input):
    """Single-line prompt with history."""

    BINDINGS = [
        Binding("up", "history(-1)", "Previous", show=False),
        Binding("down", "history(1)", "Next", show=False),
    ]

    def __init__(self, **kwargs):
        super().__init__(placeholder="Type a message and press Enter", **kwargs)
        self.history: list[str] = []
        self._pos = 0  # index into history; len(history) = the draft being typed
        self._draft = ""

    def remember(self, text: str) -> None:
        """Adds a sent message to the history (consecutive duplicates once)."""
        if text and (not self.history or self.history[-1] != text):
            self.history.append(text)
        self._pos = len(self.history)
        self._draft = ""

    def action_history(self, step: int) -> None:
        if not self.history:
            return
        if self._pos == len(self.history):
            self._draft = self.value
        self._pos = max(0, min(len(self.history), self._pos + step))
        self.value = self._draft if self._pos == len(self.history) else self.history[self._pos]
        self.cursor_position = len(self.value)
