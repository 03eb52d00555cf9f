"""Sessions sidebar: saved sessions (name, context length, size, tier) and the keys that act on them."""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Label, ListItem, ListView, Static

from .backend import SessionRow
from .format import human_bytes, human_count
from .messages import SessionAction

UNAVAILABLE = ("Sessions are not available with this engine build (no sessions API): "
               "the chat is kept in memory only.")


def key_line(rename: bool) -> str:
    """The sidebar's keys, in lines that fit its width; rename only when the engine has it."""
    keys = ["n new"] + (["r rename"] if rename else []) + ["d delete", "e export", "i import"]
    return " · ".join(keys[:3]) + "\n" + " · ".join(keys[3:])


# What the tier of a session means; the sidebar and the help screen both use these names.
TIERS = {
    "memory": "open: its K/V are in the KV pool",
    "ssd": "open, but its K/V blocks were moved to the SSD tier",
    "disk": "saved to its file only (opening it restores the K/V)",
}


def tier_label(tier: str | None) -> str:
    """The name the sidebar shows for a session's tier. An open session with nothing in its context yet is
    reported as "none" by the API; it is open, in memory, like any other open session."""
    if tier == "none":
        return "memory"
    return tier or "-"


class SessionItem(ListItem):
    """One session; `name` None is the unsaved in-memory chat."""

    def __init__(self, row: SessionRow | None, current: bool):
        super().__init__()
        self.row = row
        self.current = current

    @property
    def session_name(self) -> str | None:
        return self.row.name if self.row else None

    def compose(self):
        mark = "▶ " if self.current else "  "
        if self.row is None:
            yield Label(Text.assemble(mark, ("unsaved chat", "italic")))
            return
        r = self.row
        yield Label(Text.assemble(mark, (r.name, "bold")))
        ctx = "-" if r.context_length is None else f"{human_count(r.context_length)} tok"
        yield Label(f"  {ctx} · {human_bytes(r.cache_size_bytes)} · {tier_label(r.tier)}", classes="detail")


class SessionsSidebar(Vertical):
    """Lists sessions; Enter opens one, n/r/d/e/i act on them (only while the list has focus)."""

    DEFAULT_CSS = """
    SessionsSidebar { width: 32; max-width: 45%; border-right: vkey $primary-background; padding: 0 1 0 0; }
    SessionsSidebar .title { text-style: bold; color: $primary; padding: 0 1; }
    SessionsSidebar ListView { height: 1fr; background: transparent; }
    SessionsSidebar .detail { color: $text-muted; }
    SessionsSidebar #notice { color: $warning; padding: 0 1 1 1; }
    SessionsSidebar #keys { color: $text-muted; padding: 0 1; height: auto; }
    """

    # Listed in the sidebar's own key line, not the footer: with them the footer no longer fits 80 columns.
    BINDINGS = [
        Binding("n", "session('new')", "New", show=False),
        Binding("r", "session('rename')", "Rename", show=False),
        Binding("d,delete", "session('delete')", "Delete", show=False),
        Binding("e", "session('export')", "Export", show=False),
        Binding("i", "session('import')", "Import", show=False),
    ]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.available = False
        self.can_rename = False
        self.rows: list[SessionRow] = []
        self.current: str | None = None

    def compose(self):
        yield Static("Sessions", classes="title")
        yield Static("Loading…", id="notice")
        yield ListView(id="session-list")
        yield Static("", id="keys")

    def set_capabilities(self, sessions: bool, rename: bool) -> None:
        self.available, self.can_rename = sessions, rename
        notice = self.query_one("#notice", Static)
        notice.display = not sessions
        notice.update(UNAVAILABLE)
        self.query_one("#keys", Static).update(key_line(rename) if sessions else "")

    async def show(self, rows: list[SessionRow], current: str | None) -> None:
        """Redraws the list, keeping the cursor on the same session where possible."""
        lv = self.query_one(ListView)
        if lv.children and (rows, current) == (self.rows, self.current):
            return  # unchanged: keep the widgets (rebuilding them is the slow part)
        keep = self.selected_name() if lv.index is not None else current
        self.rows, self.current = rows, current
        await lv.clear()
        items = [SessionItem(None, current is None)] + [SessionItem(r, r.name == current) for r in rows]
        await lv.extend(items)
        names = [it.session_name for it in items]
        lv.index = names.index(keep) if keep in names else (names.index(current) if current in names else 0)

    def selected_name(self) -> str | None:
        item = self.query_one(ListView).highlighted_child
        return item.session_name if isinstance(item, SessionItem) else None

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        event.stop()
        if isinstance(event.item, SessionItem):
            self.post_message(SessionAction("switch", event.item.session_name))

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "session":
            if not self.available:
                return False
            if parameters and parameters[0] == "rename" and not self.can_rename:
                return False
        return True

    def action_session(self, what: str) -> None:
        name = self.selected_name()
        if what in ("rename", "delete", "export") and name is None:
            self.notify("Select a saved session first (the unsaved chat has none).", severity="warning")
            return
        self.post_message(SessionAction(what, name))
