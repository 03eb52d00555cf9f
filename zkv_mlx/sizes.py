"""Size strings of the configuration ("4GB", "512MiB", bytes) parsed into bytes."""

from __future__ import annotations

import re
from typing import Any

from .errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any, what: str = "size") -> int:
    """Parses "4GB", "512MiB", "1.5G" or plain bytes into an int.

    Args:
        value: str or int.
        what: name of the setting, for the error message.
    Returns:
        The size in bytes.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size like '4GB' or '512MiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigError(f"{what}: must be positive, got {value!r}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{what}: cannot parse {value!r}; use a size like '4GB', '512MiB' or a number of bytes")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ConfigError(f"{what}: must be positive, got {value!r}")
    return n
