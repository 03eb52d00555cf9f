"""A live map of the KV pool: one cell per block (or per group of blocks when the pool is larger than the panel)."""

from __future__ import annotations

from collections import Counter

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

# state -> (glyph, style); glyphs differ too, so the map reads without colour.
STYLES = {
    "free": ("·", "grey50"),
    "used": ("█", "green"),
    "shared": ("▓", "cyan"),
    "cached": ("▒", "dodger_blue2"),
    "pinned": ("◆", "magenta"),
    "ssd": ("░", "dark_orange"),
}
# A cell covering several blocks shows the first of these states that it holds.
PRIORITY = ("pinned", "used", "shared", "cached", "ssd", "free")


def cells(states: list[str], n_cells: int) -> tuple[list[str], int]:
    """Groups block states into at most n_cells cells. A cell shows the most notable state among its blocks
    (PRIORITY order), so a few cached blocks in a large pool stay visible; the legend has the exact counts.

    Returns:
        (state per cell, blocks per cell).
    """
    if n_cells <= 0 or not states:
        return [], 1
    per = max(1, -(-len(states) // n_cells))
    rank = {s: i for i, s in enumerate(PRIORITY)}
    out = [min(states[i:i + per], key=lambda s: rank.get(s, 0)) for i in range(0, len(states), per)]
    return out, per


class BlockMap(Widget):
    """Draws block states in a grid of at most `max_rows` rows, with a legend."""

    DEFAULT_CSS = """
    BlockMap { height: auto; }
    """

    states: reactive[tuple[str, ...]] = reactive(tuple, layout=True)
    exact: reactive[bool] = reactive(True)
    ssd_blocks: reactive[int] = reactive(0)  # blocks in the SSD tier (outside the memory pool)

    def __init__(self, max_rows: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.max_rows = max_rows

    def render(self) -> Text:
        width = max(1, self.size.width)
        text = Text()
        grid, per = cells(list(self.states), width * self.max_rows)
        for i, state in enumerate(grid):
            glyph, style = STYLES.get(state, STYLES["used"])
            text.append(glyph, style=style)
            if (i + 1) % width == 0 and i + 1 < len(grid):
                text.append("\n")
        if not grid:
            text.append("no blocks", style="grey50")
        counts = Counter(self.states)
        for i, state in enumerate(("free", "used", "shared", "cached", "pinned", "ssd")):
            glyph, style = STYLES[state]
            text.append("\n" if i % 2 == 0 else "  ")
            text.append(glyph, style=style)
            count = counts.get(state, 0) or (self.ssd_blocks if state == "ssd" else 0)
            text.append(f" {state:<6}{count:>6}")
        note = f"1 cell = {per} blocks" if per > 1 else "1 cell = 1 block"
        if not self.exact:
            note += "; estimated from counts"
        text.append(f"\n{note}", style="italic grey50")
        return text
