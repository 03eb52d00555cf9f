"""Timestamps as users see them: ISO-8601 UTC with a `Z` suffix (session files keep Unix times)."""

from __future__ import annotations

from datetime import datetime, timezone


def iso_utc(t: float | int | str | None) -> str | None:
    """Formats a Unix time as ISO-8601 UTC to the second, e.g. `2024-01-15T10:30:00Z`.

    Args:
        t: seconds since the Unix epoch (float or int), an already formatted string (returned unchanged), or None.
    Returns:
        The formatted string, or None when `t` is None or not a usable time (an old or hand-edited session file
        must still list and load).
    """
    if t is None:
        return None
    if isinstance(t, str):  # already formatted by us; anything else in a string is not a time
        try:
            datetime.strptime(t, "%Y-%m-%dT%H:%M:%SZ")
            return t
        except ValueError:
            return None
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        return None
    try:
        return datetime.fromtimestamp(float(t), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):  # NaN, inf or beyond year 9999
        return None


def epoch_or_none(t) -> float | None:
    """A session file's time as a Unix time, or None when it is missing or not a usable time (a string, NaN, out of
    range): such a value is never shown or written back."""
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        return None
    return float(t) if iso_utc(t) is not None else None
