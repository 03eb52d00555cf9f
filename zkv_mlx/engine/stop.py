"""When a sequence stops: small pure functions over token ids and text (after vLLM's `check_stop` and
`check_stop_strings`). The engine calls them after each sampled token; they never touch engine state."""

from __future__ import annotations


def is_eos(token: int, eos: set[int] | frozenset[int], ignore_eos: bool) -> bool:
    """Whether `token` ends generation as an end-of-sequence token."""
    return token in eos and not ignore_eos


def check_length(n_output: int, num_tokens: int, max_tokens: int, max_context: int) -> str | None:
    """"length" once the request has its `max_tokens` outputs or the sequence fills the context, else None.

    Args:
        n_output: generated tokens so far. num_tokens: prompt + generated (+ any token still in flight).
    """
    if n_output >= max_tokens or num_tokens >= max_context:
        return "length"
    return None


def find_stop(text: str, emitted: int, stop: tuple[str, ...]) -> int:
    """Index in `text` where the first stop string begins, or -1.

    Only text that could contain a new match is searched: from `len(longest stop)` characters before `emitted`
    (characters already sent), since a stop string may straddle what was sent and what was just added.
    """
    if not stop:
        return -1
    start = max(0, emitted - max(map(len, stop)))
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(hits, default=-1)


def hold_back(stop: tuple[str, ...]) -> int:
    """Characters kept unsent at the end of the text: a stop string may be starting there."""
    return max(map(len, stop)) - 1 if stop else 0


def releasable(text: str, emitted: int, stop: tuple[str, ...]) -> str:
    """The prefix of `text` that may be sent now (never less than what was already sent)."""
    return text[: max(emitted, len(text) - hold_back(stop))]
