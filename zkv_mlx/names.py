"""The one rule for session names (and user ids that become directory names), shared by every entry point.

A name becomes a file name (`<data dir>/sessions/<user>/<name>.zkvs`), so it may hold no path separator, no control
character and no '.'/'..'; it is matched with `re.fullmatch` because `$` would also accept a trailing newline.
No dependencies beyond zkv_mlx.errors: the TUI imports it without loading MLX.
"""

from __future__ import annotations

import re

from .errors import SessionError

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
_NAME_RE = re.compile(NAME_PATTERN)


def is_valid_name(name) -> bool:
    """Whether `name` is a str that follows NAME_RULE."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def check_name(name: str, what: str = "session name") -> str:
    """Validates a session name.

    Args:
        name: the candidate. what: how the message calls it ("session name", "stored session name", ...).
    Returns:
        `name` unchanged.
    Raises:
        SessionError: naming the value (its repr, so control characters show) and the rule.
    """
    if not is_valid_name(name):
        raise SessionError(f"invalid {what} {name!r}: use {NAME_RULE} (no spaces, control characters or path "
                           "separators)")
    return name
