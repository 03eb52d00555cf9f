"""The help screen (F1): keys and what each panel shows."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# zkv-mlx chat

## Keys
| key | what it does |
|---|---|
| Enter | send the message |
| Up / Down (in the message box) | walk through what you sent before |
| Esc | stop the reply being generated |
| Ctrl+N | new session |
| Ctrl+L | clear the conversation (and the open session's context) |
| F2 | show / hide the sessions sidebar |
| F3 | show / hide the cache panel |
| Tab / Shift+Tab | move between the message box and the sessions list |
| Ctrl+P | command palette (every action by name) |
| F1 | this help |
| Ctrl+Q | quit |

In the sessions list: Enter opens the session, **n** new, **r** rename, **d** delete (asks first),
**e** export to a file, **i** import a file.

## Panels
- **Chat**: replies stream in as Markdown. Under each reply: time to first token (TTFT), decode speed (tok/s),
  tokens generated and how many prompt tokens came from the prefix cache (prefix hit).
- **Sessions**: saved conversations with their context length, KV size and tier (memory or SSD).
  Without the sessions API the chat is kept in memory only and the sidebar says so.
- **KV cache**: memory and SSD usage, prefix-cache hit rate, tokens saved by prefix hits, evictions, and the block
  map: `·` free, `█` used, `▓` shared, `▒` cached, `◆` pinned, `░` on SSD.

Press Esc or F1 to close.
"""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90%; max-width: 100; height: 90%; border: thick $primary;
                                  background: $surface; }
    """

    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self):
        with VerticalScroll():
            yield Markdown(HELP)
