"""Shown while the model loads (a worker thread builds it); shows the error instead if loading fails."""

from __future__ import annotations

import time

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Label, ProgressBar


class LoadingScreen(Screen[None]):
    """Indeterminate progress (the engine reports no load fractions yet) with the elapsed time."""

    DEFAULT_CSS = """
    LoadingScreen { align: center middle; }
    LoadingScreen > Vertical { width: 70; max-width: 100%; height: auto; border: round $primary; padding: 1 2; }
    LoadingScreen Label { width: 100%; }
    LoadingScreen #elapsed { color: $text-muted; }
    LoadingScreen #error { color: $error; display: none; }
    """

    BINDINGS = [Binding("q", "app.quit", "Quit", show=False)]

    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.t0 = time.monotonic()
        self.failed = False

    def compose(self):
        with Vertical():
            yield Label(f"Loading {self.what}…", id="what")
            yield ProgressBar(total=None, show_eta=False, show_percentage=False, id="progress")
            yield Label("", id="elapsed")
            yield Label("", id="error")
        yield Footer()

    def on_mount(self) -> None:
        self._timer = self.set_interval(0.5, self._tick)

    def _tick(self) -> None:
        if not self.failed:
            self.query_one("#elapsed", Label).update(f"{time.monotonic() - self.t0:.0f} s")

    def show_error(self, error: str) -> None:
        self.failed = True
        self._timer.stop()
        self.query_one("#what", Label).update(f"Could not load {self.what}")
        self.query_one("#progress").display = False
        err = self.query_one("#error", Label)
        err.update(f"{error}\n\nPress q to quit.")
        err.display = True
