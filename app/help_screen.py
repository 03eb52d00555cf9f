"""The help screen (F1): keys and what each panel shows."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

from .sessions_sidebar import TIERS, key_line

KEYS = [
    ("Enter", "send the message"),
    ("Ctrl+J", "new line in the message (a paste keeps all its lines)"),
    ("Up / Down (in the message box)", "walk through what you sent before"),
    ("Esc", "stop the reply being generated"),
    ("Ctrl+N", "new session"),
    ("Ctrl+L", "clear the conversation (and the open session's context)"),
    ("F2", "show / hide the sessions sidebar"),
    ("F3", "show / hide the cache panel"),
    ("Tab / Shift+Tab", "move between the message box, the chat and the sessions list"),
    ("Ctrl+P", "command palette (every action by name)"),
    ("F1", "this help"),
    ("Ctrl+Q", "quit"),
]


def help_text(sessions: bool = True, rename: bool = False) -> str:
    """The help as Markdown, listing only what this engine build offers.

    Args:
        sessions: whether the engine has the sessions API (else no session keys are listed).
        rename: whether it has rename_session().
    Returns:
        Markdown text.
    """
    keys = [(k, what) for k, what in KEYS if sessions or k != "Ctrl+N"]
    rows = "\n".join(f"| {k} | {what} |" for k, what in keys)
    if sessions:
        tiers = "\n".join(f"  - `{name}`: {what}" for name, what in TIERS.items())
        session_keys = (f"In the sessions list: Enter opens a session; {key_line(rename).replace(chr(10), ' · ')} "
                        "(delete asks first).\n\n"
                        "Typing while the chat has focus moves the text to the message box.")
        sessions_panel = ("- **Sessions**: saved conversations with their context length, KV size and tier:\n"
                          f"{tiers}")
    else:
        session_keys = "Typing while the chat has focus moves the text to the message box."
        sessions_panel = "- **Sessions**: this engine build has no sessions API; the chat is kept in memory only."
    return f"""\
# zkv-mlx chat

## Keys
| key | what it does |
|---|---|
{rows}

{session_keys}

## Panels
- **Chat**: replies stream in as Markdown. Under each reply: time to first token (TTFT), decode speed (tok/s),
  tokens generated and how many prompt tokens came from the prefix cache (prefix hit).
{sessions_panel}
- **KV cache**: memory and SSD usage, prefix-cache hit rate, tokens saved by prefix hits, evictions, and the block
  map: `·` free, `█` used, `▓` shared, `▒` cached, `◆` pinned, `░` on SSD.
  Every figure is what `kv_cache_stats()` returns.

On a terminal narrower than 110 columns the cache panel is hidden, below 80 the sidebar too (F3 / F2 show them).

Press Esc or F1 to close.
"""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90%; max-width: 100; height: 90%; border: thick $primary;
                                  background: $surface; }
    """

    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def __init__(self, sessions: bool = True, rename: bool = False):
        super().__init__()
        self.text = help_text(sessions, rename)

    def compose(self):
        with VerticalScroll():
            yield Markdown(self.text)
