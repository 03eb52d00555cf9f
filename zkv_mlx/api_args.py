"""Argument helpers of the public API (zkv_mlx/api.py): sampling keyword arguments and session paths."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

SAMPLING_KEYS = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
                 "ignore_eos"}


def is_file(path: str) -> bool:
    """True when `path` names an existing file (False for a string that cannot be a path)."""
    # Path.is_file raises ValueError on a NUL byte: such a string is a bad name, not a file.
    try:
        return Path(path).is_file()
    except (ValueError, OSError):
        return False


def sampling_params(kw: dict) -> dict:
    """The sampling keyword arguments of a call, None values dropped; ConfigError names unknown ones."""
    unknown = set(kw) - SAMPLING_KEYS
    if unknown:
        raise ConfigError(f"unknown sampling option(s): {', '.join(sorted(unknown))}; "
                          f"valid: {', '.join(sorted(SAMPLING_KEYS))}")
    kw = {k: v for k, v in kw.items() if v is not None}
    if "stop" in kw and isinstance(kw["stop"], list):
        kw["stop"] = tuple(kw["stop"])
    return kw
