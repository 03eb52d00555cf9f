"""Session flows for the chat app: dialogs (name, confirm, file) and the workers that call the sessions API."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from textual import work
from textual.app import SystemCommand

from zkv_mlx.errors import SessionError
from zkv_mlx.names import check_name

from .backend import BackendClosed, describe
from .confirm_screen import ConfirmScreen
from .file_dialog import FileDialog
from .messages import SessionAction, SessionOpened, SessionsUpdated
from .text_prompt_screen import TextPromptScreen

SESSION_SUFFIX = ".zkvs"  # what zkv_mlx session files are called


class SessionActions:
    """Mixed into ZkvChatApp (which provides backend, turn, notify, push_screen, ...)."""

    # -- what the sidebar and the palette ask for -----------------------------------------------------
    def on_session_action(self, msg: SessionAction) -> None:
        msg.stop()
        self.session_action(msg.action, msg.name)

    def session_action(self, action: str, name: str | None = None) -> None:
        b = self.backend
        if b is None or not b.caps.sessions:
            self.notify("Sessions are not available with this engine build.", severity="warning")
            return
        if action in ("switch", "new", "delete", "import") and self.turn is not None:
            self.notify("Wait for the reply or stop it (Esc) first.", severity="warning")
            return
        if action == "switch":
            self.query_one("#prompt").focus()
            if name != b.session_name:
                self.run_session_op("open", lambda: self._opened(b.switch(name)))
        elif action == "new":
            def create(new: str | None) -> None:
                if new is not None and (not new or self._name_ok(new)):
                    self.run_session_op("create", lambda: self._opened(b.new_session(new or None)))

            self.push_screen(TextPromptScreen("Name of the new session (empty: a generated name)"), create)
        elif action == "rename":
            if not b.caps.rename:
                self.notify("Renaming needs rename_session() in the engine API.", severity="warning")
                return

            def rename(new: str | None) -> None:
                if new and new != name and self._name_ok(new):
                    self.run_session_op("rename", lambda: self._renamed(name, new))

            self.push_screen(TextPromptScreen(f"Rename session {name} to", value=name or ""), rename)
        elif action == "delete":
            def delete(ok: bool | None) -> None:
                if ok:
                    self.run_session_op("delete", lambda: self._deleted(name))

            self.push_screen(ConfirmScreen(f"Delete session {name}? Its saved context is removed for good.",
                                           yes="Delete"), delete)
        elif action == "export":
            def export(path: str | None) -> None:
                if not path:
                    return
                if self.turn is not None and name == b.session_name:
                    # Exporting now would write the state from before this turn: wait for the reply.
                    self._pending_export = (name, path)
                    self.notify(f"{name} is generating a reply; it will be exported to {path} when the reply "
                                "ends.", title="Export after the reply")
                    return
                self.run_session_op("export", lambda: self._exported(name, path))

            self.push_screen(FileDialog(f"Export session {name} to", mode="save", start=Path.cwd(),
                                        filename=f"{name}{SESSION_SUFFIX}"), export)
        elif action == "import":
            def import_(path: str | None) -> None:
                if path:
                    self.run_session_op("import", lambda: self._imported(path))

            self.push_screen(FileDialog("Import a session file", mode="open", start=Path.cwd()), import_)

    def _name_ok(self, name: str) -> bool:
        """Applies the engine's one session-name rule before anything is created, renamed or imported."""
        try:
            check_name(name)
        except SessionError as e:
            self.notify(str(e), title="Invalid session name", severity="error")
            return False
        return True

    def run_pending_export(self) -> None:
        """Runs an export that was asked for while the session was generating (called when the turn ends)."""
        pending, self._pending_export = self._pending_export, None
        if pending is not None:
            name, path = pending
            self.run_session_op("export", lambda: self._exported(name, path))

    def action_new_session(self) -> None:
        self.session_action("new")

    def session_commands(self) -> Iterable[SystemCommand]:
        """Command palette entries (they act on the open session)."""
        b = self.backend
        if b is None or not b.caps.sessions:
            return
        cur = b.session_name
        yield SystemCommand("Session: new", "Create a session and switch to it (Ctrl+N)",
                            lambda: self.session_action("new"))
        yield SystemCommand("Session: import", "Import a session file", lambda: self.session_action("import"))
        yield SystemCommand("Session: unsaved chat", "Leave the session for an in-memory chat",
                            lambda: self.session_action("switch", None))
        if cur is None:
            return
        if b.caps.rename:
            yield SystemCommand(f"Session: rename {cur}", "Rename the open session",
                                lambda: self.session_action("rename", cur))
        yield SystemCommand(f"Session: export {cur}", "Write the open session to a file",
                            lambda: self.session_action("export", cur))
        yield SystemCommand(f"Session: delete {cur}", "Delete the open session (asks first)",
                            lambda: self.session_action("delete", cur))

    # -- workers (these run in threads: post messages, never touch widgets) ---------------------------
    @work(thread=True, group="session-op")
    def run_session_op(self, what: str, fn: Callable[[], object]) -> None:
        self._session_op(what, fn)

    @work(thread=True, group="session-op")
    def open_start_session(self, name: str) -> None:
        """Opens --session NAME, creating it when it does not exist."""
        b = self.backend

        def start():
            names = {r.name for r in b.list_sessions()}
            self._opened(b.switch(name) if name in names else b.new_session(name))

        self._session_op("open", start)

    def _session_op(self, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except BackendClosed:
            return
        except Exception as e:
            self.call_from_thread(self.notify, describe(e), title=f"Session {what} failed", severity="error")
        self._post_sessions()

    @work(thread=True, group="sessions")
    def refresh_sessions(self) -> None:
        self._post_sessions()

    def _post_sessions(self) -> None:
        b = self.backend
        if b is None:
            return
        try:
            self.post_message(SessionsUpdated(b.list_sessions(), b.session_name))
        except BackendClosed:
            pass
        except Exception as e:
            self.call_from_thread(self.notify, describe(e), title="Listing sessions failed", severity="error")

    def _opened(self, session) -> None:
        # None for the unsaved chat: the app shows the transcript it kept for it.
        b = self.backend
        msgs = b.session_messages(session) if session is not None else None
        self.post_message(SessionOpened(b.session_name, msgs))

    def _renamed(self, old: str, new: str) -> None:
        b = self.backend
        b.rename_session(old, new)
        if b.session_name == new:
            self.post_message(SessionOpened(new, b.session_messages()))
        self.call_from_thread(self.notify, f"Renamed {old} to {new}")

    def _deleted(self, name: str) -> None:
        b = self.backend
        was_open = b.session_name == name
        b.delete_session(name)
        self.call_from_thread(self.notify, f"Deleted session {name}")
        if was_open:
            self.post_message(SessionOpened(None, None))

    def _exported(self, name: str, path: str) -> None:
        self.backend.export_session(name, path)
        self.call_from_thread(self.notify, f"Exported {name} to {path}")

    def _imported(self, path: str, name: str | None = None) -> None:
        b = self.backend
        try:
            name = b.import_session(path, name)
        except SessionError as e:
            # A plain SessionError (not a format or mismatch error) means the name is taken: offer another.
            if type(e) is not SessionError or not b.import_takes_name:
                raise
            self.call_from_thread(self._ask_import_name, path, describe(e))
            return
        self.call_from_thread(self.notify, f"Imported {Path(path).name} as session {name}")
        self._opened(b.switch(name))

    def _ask_import_name(self, path: str, why: str) -> None:
        def retry(name: str | None) -> None:
            if name and self._name_ok(name):
                self.run_session_op("import", lambda: self._imported(path, name))

        suggestion = Path(path).name.split(".")[0] + "-imported"
        self.push_screen(TextPromptScreen(f"{why}\nImport it as:", value=suggestion), retry)
