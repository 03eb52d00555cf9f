"""Chat template rendering as transformers does it: a sandboxed Jinja environment with ``trim_blocks``/
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now`` and a ``tojson`` filter."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

__all__ = ["CHATML_TEMPLATE", "compile_template", "render_template"]

# Used when a model ships no chat template: plain ChatML, the format of most small instruct models.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def compile_template(chat_template: str | None):
    """Compiles a Jinja chat template (ChatML when None or empty)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(chat_template or CHATML_TEMPLATE)


def render_template(template, **variables: Any) -> str:
    """Renders a compiled chat template.

    Raises:
        ValueError: The template failed to render or called ``raise_exception``.
    """
    from jinja2 import TemplateError

    try:
        return template.render(raise_exception=_raise_exception, **variables)
    except TemplateError as e:
        raise ValueError(f"chat template failed to render: {e}") from e


def _raise_exception(message: str):
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    # Same as transformers: keep non-ASCII text as is (Jinja's own tojson escapes it to \uXXXX).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
