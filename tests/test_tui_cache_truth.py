"""The cache panel tells the truth (issue #17, section 7): with the real engine on the bundled model and fresh
data/cache dirs (conftest.py), every figure on the panel is the one `kv_cache_stats()` returns."""

import pytest

from test_tui import aio, loaded, text_of, until
from zkv_mlx.app import make_app
from zkv_mlx.app.backend import CacheStats
from zkv_mlx.app.cache_panel import CachePanel
from zkv_mlx.app.format import human_bytes, human_count
from zkv_mlx.app.sessions_sidebar import SessionItem, SessionsSidebar

pytestmark = pytest.mark.slow


LABELS = ("Memory", "Cached", "SSD", "SSD blocks", "To SSD", "From SSD", "Hit rate", "Lookups", "Tokens saved",
          "Evictions", "Fragmentation", "Blocks")


def figures(panel) -> dict[str, str]:
    """The panel's figure lines as {label: value}; labels fill a column of 8 (bars) or 14 characters."""
    out = {}
    for line in text_of(panel.query_one("#figures")).splitlines():
        for width in (14, 8):
            if line[:width].strip() in LABELS:
                out[line[:width].strip()] = line[width:].strip()
                break
    return out


def expected(raw: dict) -> dict[str, str]:
    """What each figure must read, worked out from the stats dict alone."""
    return {
        "Memory": f"{human_bytes(raw['used_size'])} / {human_bytes(raw['total_size'])}",
        "Cached": human_bytes(raw["cached_size"]),
        "SSD": (f"{human_bytes(raw['ssd_size'])} / {human_bytes(raw['ssd_capacity'])}" if raw["ssd_capacity"]
                else f"on · {human_bytes(raw['ssd_size'])} used"),
        "SSD blocks": str(raw["ssd_blocks"]),
        "To SSD": str(raw["ssd_spills"]),
        "From SSD": str(raw["ssd_promotions"]),
        "Hit rate": f"{100 * raw['hit_rate']:.1f}%",
        "Lookups": f"{raw['prompt_cache_hits']} hit / {raw['prompt_cache_misses']} miss",
        "Tokens saved": human_count(raw["hit_tokens"]),
        "Evictions": human_count(raw["evictions"]),
        "Fragmentation": f"{100 * raw['fragmentation']:.1f}%",
        "Blocks": f"{human_count(raw['blocks_used'])} used / {human_count(raw['blocks_total'])}",
    }


@aio
async def test_every_cache_panel_figure_is_the_apis_kv_cache_stats():
    from zkv_mlx import ZKV

    models = []

    def factory():
        models.append(ZKV(kv_cache_memory="64MB"))
        return models[0]

    app = make_app(factory, stats_interval=0, sampling={"max_tokens": 4, "temperature": 0.0})
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: app.backend is not None, timeout=180)  # loading the bundled model
        await loaded(pilot)
        panel = app.query_one(CachePanel)
        model = models[0]

        async def check(when: str) -> None:
            n = panel.updates
            app.refresh_stats()
            await until(pilot, lambda: panel.updates > n, timeout=60)
            await pilot.pause()
            raw = model.kv_cache_stats()  # the API, called directly; the engine is idle, so nothing moved
            assert panel.stats.raw == raw, when
            shown = figures(panel)
            assert set(expected(raw)) == set(LABELS)
            for label, value in expected(raw).items():
                assert shown.get(label) == value, (when, label, shown)
            assert raw["ssd_enabled"] is True and "not available" not in text_of(panel.query_one("#figures"))
            bmap = panel.query_one("#block-map")
            assert bmap.ssd_blocks == raw["ssd_blocks"]
            assert len(bmap.states) == raw["blocks_total"]
            # Cached blocks sit in the free queue: "free" in the stats counts them, the map tells them apart.
            assert bmap.states.count("cached") == raw["blocks_cached"]
            assert bmap.states.count("free") == raw["blocks_free"] - raw["blocks_cached"]
            assert sum(s in ("used", "shared", "pinned") for s in bmap.states) == raw["blocks_used"]

        await check("fresh dirs, before any request")
        for question in ("Hello, who are you?", "And what is a KV cache?"):
            app.query_one("#prompt").value = question
            app.query_one("#prompt").focus()
            await pilot.press("enter")
            await until(pilot, lambda: app.turn is None and app.reply is None, timeout=120)
        await check("after two turns")
        assert panel.stats.raw["prompt_cache_hits"] + panel.stats.raw["prompt_cache_misses"] >= 2

        # The sidebar names a new, empty session's tier "memory", as docs/tui.md says (the API says "none").
        app.session_action("new")
        await pilot.press(*"fresh", "enter")
        await until(pilot, lambda: app.query_one(SessionsSidebar).current == "fresh", timeout=60)
        await pilot.pause()
        item = next(i for i in app.query(SessionItem) if i.session_name == "fresh")
        assert text_of(item.query_one(".detail")).strip().endswith("· memory")


def test_ssd_line_says_what_the_stats_say():
    from zkv_mlx.app.cache_panel import stats_view
    from rich.console import Console
    import io

    def render(raw):
        console = Console(width=40, record=True, file=io.StringIO())
        console.print(stats_view(CacheStats(raw), 30))
        return console.export_text()

    on = render({"ssd_enabled": True, "ssd_size": 0, "ssd_capacity": 9_000_000_000, "ssd_blocks": 0})
    assert "SSD     0 B / 8.38 GiB" in on and "SSD blocks    0" in on
    assert "SSD     off" in render({"ssd_enabled": False, "ssd_size": 0, "ssd_capacity": 0})
    assert "SSD     on · 0 B used" in render({"ssd_enabled": True, "ssd_size": 0, "ssd_capacity": 0})
    assert "SSD     not reported" in render({})
