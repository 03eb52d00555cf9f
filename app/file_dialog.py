"""A file dialog for session export (save) and import (open): a directory tree plus an editable path."""

from __future__ import annotations

from pathlib import Path

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DirectoryTree, Input, Label

from .confirm_screen import ConfirmScreen


class FileDialog(ModalScreen[str | None]):
    """Dismisses with the chosen path, or None when cancelled.

    Args:
        title: what the dialog is for.
        mode: "open" (an existing file) or "save" (a new file in an existing directory).
        start: directory shown first.
        filename: suggested file name in save mode.
    """

    DEFAULT_CSS = """
    FileDialog { align: center middle; }
    FileDialog > Vertical { width: 80%; height: 80%; border: thick $primary; background: $surface; padding: 0 1; }
    FileDialog DirectoryTree { height: 1fr; }
    FileDialog Label { width: 100%; }
    FileDialog .hint { color: $text-muted; }
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, mode: str = "open", start: str | Path = ".", filename: str = ""):
        super().__init__()
        self.title_text, self.mode = title, mode
        self.start = Path(start).expanduser().resolve()
        self.filename = filename

    def compose(self):
        with Vertical():
            yield Label(self.title_text)
            yield DirectoryTree(self.start)
            value = str(self.start / self.filename) if self.mode == "save" else str(self.start) + "/"
            yield Input(value, id="path")
            yield Label("Pick in the tree or type a path; Enter in the path box accepts, Esc cancels.",
                        classes="hint")

    def on_mount(self) -> None:
        self.query_one("#path", Input).focus()

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        event.stop()
        path = self.query_one("#path", Input)
        path.value = str(event.path)
        path.focus()

    def on_directory_tree_directory_selected(self, event: DirectoryTree.DirectorySelected) -> None:
        event.stop()
        path = self.query_one("#path", Input)
        name = Path(path.value).name if self.mode == "save" and not path.value.endswith("/") else ""
        path.value = str(event.path / name) if name else str(event.path) + "/"

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        path = Path(event.value.strip()).expanduser()
        if self.mode == "open" and not path.is_file():
            self.notify(f"{path} is not a file; pick a session file to import", severity="error")
            return
        if self.mode == "save" and (not path.name or path.is_dir() or not path.parent.is_dir()):
            self.notify(f"{path}: give a file name in an existing directory", severity="error")
            return
        if self.mode == "save" and path.exists():
            def replace(ok: bool | None) -> None:
                if ok:
                    self.dismiss(str(path))

            self.app.push_screen(ConfirmScreen(f"{path} already exists. Replace it?", yes="Replace"), replace)
            return
        self.dismiss(str(path))

    def action_cancel(self) -> None:
        self.dismiss(None)
