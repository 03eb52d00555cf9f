"""Cache panel: memory and SSD usage, prefix-cache hit rate, tokens saved, evictions and the block map."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

from .backend import CacheStats
from .block_map import BlockMap
from .format import bar, bar_parts, human_bytes, human_count


def stats_view(stats: CacheStats, width: int) -> Group:
    """The figures above the block map: usage bars, then one figure per line."""
    rows: list[Text] = []

    def usage(label: str, used, total, style: str) -> None:
        if not total:
            rows.append(Text.assemble((f"{label:<8}", "bold"), ("not available", "grey50")))
            return
        rows.append(Text.assemble((f"{label:<8}", "bold"), f"{human_bytes(used)} / {human_bytes(total)}"))
        rows.append(Text(bar(used / total, width), style=style))

    used, cached, total = stats.get("used_size"), stats.get("cached_size"), stats.get("total_size")
    if total and cached is not None:
        # Used (green) and cached-but-reusable (blue) parts of the KV pool.
        rows.append(Text.assemble(("Memory  ", "bold"), f"{human_bytes(used)} / {human_bytes(total)}"))
        n_used, n_cached = bar_parts([(used or 0) / total, cached / total], width)
        rows.append(Text.assemble(("█" * n_used, "green"), ("▒" * n_cached, "dodger_blue2"),
                                  ("░" * (width - n_used - n_cached), "grey50")))
        rows.append(Text.assemble(("Cached  ", "bold"), human_bytes(cached)))
    else:
        usage("Memory", used, total, "green")
    ssd_view(stats, rows, width)

    def figure(label: str, value: str) -> None:
        rows.append(Text.assemble((f"{label:<14}", "bold"), value))

    rate = stats.get("hit_rate")
    figure("Hit rate", "-" if rate is None else f"{100 * rate:.1f}%")
    hits, misses = stats.get("prompt_cache_hits"), stats.get("prompt_cache_misses")
    if hits is not None or misses is not None:
        figure("Lookups", f"{human_count(hits)} hit / {human_count(misses)} miss")
    figure("Tokens saved", human_count(stats.get("hit_tokens")))
    figure("Evictions", human_count(stats.get("evictions")))
    frag = stats.get("fragmentation")
    if frag is not None:
        figure("Fragmentation", f"{100 * frag:.1f}%")
    figure("Blocks", f"{human_count(stats.get('blocks_used'))} used / {human_count(stats.get('blocks_total'))}")
    return Group(*rows)


def ssd_view(stats: CacheStats, rows: list[Text], width: int) -> None:
    """The SSD tier as kv_cache_stats() reports it: off, or bytes used / budget, blocks, spills and promotions."""
    enabled = stats.get("ssd_enabled")
    if enabled is False:
        rows.append(Text.assemble(("SSD     ", "bold"), ("off", "grey50")))
        return
    if enabled is None and stats.get("ssd_capacity") is None:
        rows.append(Text.assemble(("SSD     ", "bold"), ("not reported", "grey50")))
        return
    used, capacity = stats.get("ssd_size") or 0, stats.get("ssd_capacity")
    if capacity:
        rows.append(Text.assemble(("SSD     ", "bold"), f"{human_bytes(used)} / {human_bytes(capacity)}"))
        rows.append(Text(bar(used / capacity, width), style="dark_orange"))
    else:  # on, but the engine gave no budget: show what it did give rather than inventing one
        rows.append(Text.assemble(("SSD     ", "bold"), f"on · {human_bytes(used)} used"))
    for label, key in (("SSD blocks", "ssd_blocks"), ("To SSD", "ssd_spills"), ("From SSD", "ssd_promotions")):
        if stats.get(key) is not None:
            rows.append(Text.assemble((f"{label:<14}", "bold"), human_count(stats.get(key))))


class CachePanel(VerticalScroll, can_focus=False):
    """Redrawn on every StatsUpdated (after each turn and on a timer while visible)."""

    DEFAULT_CSS = """
    CachePanel { width: 34; max-width: 45%; border-left: vkey $primary-background; padding: 0 1; }
    CachePanel .title { text-style: bold; color: $primary; }
    CachePanel #figures { height: auto; margin-bottom: 1; }
    CachePanel #prefix-note { color: $text-muted; height: auto; }
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stats: CacheStats | None = None
        self.updates = 0  # how many times stats arrived (tests wait on it)

    def compose(self):
        yield Static("KV cache", classes="title")
        yield Static("waiting for the model…", id="figures")
        yield Static("Block map", classes="title")
        yield BlockMap(id="block-map")
        yield Static("", id="prefix-note")

    def _figures_width(self) -> int:
        # Inside the scrollbar when one shows (a short terminal): bars as wide as the panel would wrap there, make the
        # content taller, and keep the scrollbar (and the wrapped bars) even after the terminal grows again.
        w = self.scrollable_content_region.width
        return max(10, w - 1) if w else 30

    def on_resize(self, event) -> None:
        if self.stats is not None:
            self.query_one("#figures", Static).update(stats_view(self.stats, self._figures_width()))

    def show(self, stats: CacheStats) -> None:
        self.stats = stats
        self.updates += 1
        self.query_one("#figures", Static).update(stats_view(stats, self._figures_width()))
        states, exact = stats.states()
        bmap = self.query_one(BlockMap)
        bmap.states, bmap.exact = tuple(states), exact
        bmap.ssd_blocks = int(stats.get("ssd_blocks") or 0)
        note = "" if "hit_rate" in stats.raw else "Prefix-cache figures are not reported by this engine build."
        self.query_one("#prefix-note", Static).update(note)
