"""Small number formatting helpers shared by the panels."""

from __future__ import annotations


def human_bytes(n: float | int | None) -> str:
    """About three significant digits: 1536 -> '1.50 KiB', 81920 -> '80.0 KiB'; None -> '-'."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    if unit == "B" or abs(n) >= 100:
        return f"{n:.0f} {unit}"
    return f"{n:.1f} {unit}" if abs(n) >= 10 else f"{n:.2f} {unit}"


def human_count(n: float | int | None) -> str:
    """12345 -> '12,345'; None -> '-'."""
    return "-" if n is None else f"{int(n):,}"


def bar(fraction: float, width: int) -> str:
    """A text usage bar, e.g. '█████░░░░░'."""
    fraction = max(0.0, min(1.0, fraction))
    full = round(fraction * width)
    return "█" * full + "░" * (width - full)


def bar_parts(fractions: list[float], width: int) -> list[int]:
    """Cell counts of consecutive bar segments (the rest of the width is empty); a non-zero part gets at
    least one cell so that it shows."""
    out, left = [], width
    for f in fractions:
        n = min(left, max(1 if f > 0 else 0, round(max(0.0, f) * width)))
        out.append(n)
        left -= n
    return out
