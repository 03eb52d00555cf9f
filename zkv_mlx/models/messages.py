"""One normalisation of chat messages for the API, sessions, the TUI and the server.

Every caller hands its messages to `normalize_messages` before the chat template sees them, so a template only
ever gets ``{"role": str, "content": str}`` dicts with a role it knows, and every shape that cannot be rendered
fails here with a `MessageError` that names the message instead of a ``TypeError`` from inside Jinja.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import MessageError

__all__ = ["ROLES", "normalize_messages"]

# The roles every supported template renders. OpenAI's "developer" is its newer name for "system".
ROLES = ("system", "user", "assistant")
_ALIASES = {"developer": "system"}
# Text parts of one message are joined with a newline, as vLLM and this project's server always did.
PART_SEPARATOR = "\n"


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """Turns what a caller sends into messages a chat template can render.

    Accepted: a string (one user message); a list or tuple of dicts with ``role`` and ``content``, where content
    is a string, None (empty text) or OpenAI content parts (``[{"type": "text", "text": "hi"}, ...]``, joined
    with a newline). ``"developer"`` becomes ``"system"``. Other keys (``name``, ...) are dropped.

    Args:
        messages: The conversation as the caller sends it.

    Returns:
        A new list of ``{"role": str, "content": str}`` dicts (the input is not modified).

    Raises:
        MessageError: (a ConfigError/ValueError) the conversation is empty, or a message is not a dict, has no
            or an unknown role, content that is neither text, None nor text parts (image parts included), or text
            that is not valid Unicode (a lone surrogate). The message names the index, e.g. ``messages[2]``.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)):
        raise MessageError(f"messages: expected a string or a list of {{'role': ..., 'content': ...}} dicts, "
                           f"got {type(messages).__name__}; wrap a single message in a list: [message]")
    if not messages:
        raise MessageError("messages: the conversation is empty; send at least one message, e.g. "
                           "[{'role': 'user', 'content': 'Hi'}]")
    return [_message(i, m) for i, m in enumerate(messages)]


def _message(i: int, m: Any) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, Mapping):
        raise MessageError(f"{where}: expected a dict with 'role' and 'content', got {type(m).__name__} "
                           f"{_short(m)}")
    if "role" not in m:
        raise MessageError(f"{where}: the message has no 'role'; add one of {', '.join(ROLES)}")
    role = m["role"]
    role = _ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise MessageError(f"{where}.role: unknown role {_short(m['role'])}; use one of {', '.join(ROLES)} "
                           "('developer' is accepted as 'system')")
    return {"role": role, "content": _content(where, m.get("content"))}


def _content(where: str, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return _text(f"{where}.content", content)
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        return PART_SEPARATOR.join(_part(f"{where}.content[{j}]", p) for j, p in enumerate(content))
    raise MessageError(f"{where}.content: expected a string, null or a list of text parts, got "
                       f"{type(content).__name__} {_short(content)}; send the text as a string")


def _part(where: str, part: Any) -> str:
    if not isinstance(part, Mapping):
        raise MessageError(f"{where}: expected a content part like {{'type': 'text', 'text': '...'}}, got "
                           f"{type(part).__name__} {_short(part)}")
    kind = part.get("type")
    if kind != "text":
        raise MessageError(f"{where}: content part type {_short(kind)} is not supported: the model reads text "
                           "only; send {'type': 'text', 'text': '...'} parts or a string")
    text = part.get("text")
    if not isinstance(text, str):
        raise MessageError(f"{where}.text: expected a string, got {type(text).__name__} {_short(text)}")
    return _text(f"{where}.text", text)


def _text(where: str, text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MessageError(f"{where}: not valid Unicode text (lone surrogate {text[e.start]!r} at character "
                           f"{e.start}); send UTF-8 text, e.g. combine surrogate pairs before sending") from None
    return text


def _short(value: Any, limit: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."
