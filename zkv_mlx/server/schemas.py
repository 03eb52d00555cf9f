"""Request bodies of the OpenAI-compatible endpoints, validated as strictly as OpenAI does.

Top-level fields are strict (no "3" for 3, no true for 1.0) and unknown ones are refused; OpenAI fields this
server does not implement are refused by name unless they hold their no-op value (`n: 1`, `tools: []`, ...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from ..names import NAME_PATTERN

# mx.random.key takes an unsigned 64-bit seed; OpenAI's seed is a signed 64-bit integer.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_TOKENS_LIMIT = 2**31 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _is_empty(v) -> bool:
    return v is None or v == [] or v == {}


# OpenAI request fields the server does not implement -> the values that mean "not used" (accepted).
CHAT_UNIMPLEMENTED = {
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": _is_empty, "tool_choice": lambda v: v is None or v == "none",
    "functions": _is_empty, "function_call": lambda v: v is None or v == "none",
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),  # means nothing without tools
    "logit_bias": _is_empty, "logprobs": lambda v: v is None or v is False, "top_logprobs": lambda v: v is None,
    "n": lambda v: v is None or (v == 1 and type(v) is int),
    "presence_penalty": lambda v: v is None or (v == 0 and type(v) in (int, float)),
    "frequency_penalty": lambda v: v is None or (v == 0 and type(v) in (int, float)),
    "audio": _is_empty, "modalities": lambda v: v is None or v == ["text"],
    "prediction": _is_empty, "web_search_options": _is_empty, "reasoning_effort": lambda v: v is None,
    "verbosity": lambda v: v is None, "store": lambda v: v is None or v is False, "metadata": _is_empty,
    "service_tier": lambda v: v is None or v in ("auto", "default"), "prompt_cache_key": lambda v: v is None,
    "safety_identifier": lambda v: v is None,
}
COMPLETION_UNIMPLEMENTED = {
    "logit_bias": _is_empty, "logprobs": lambda v: v is None, "n": CHAT_UNIMPLEMENTED["n"],
    "best_of": CHAT_UNIMPLEMENTED["n"], "echo": lambda v: v is None or v is False,
    "suffix": lambda v: v is None or v == "",
    "presence_penalty": CHAT_UNIMPLEMENTED["presence_penalty"],
    "frequency_penalty": CHAT_UNIMPLEMENTED["frequency_penalty"],
}


def _refuse_unimplemented(data: Any, table: dict) -> Any:
    """Drops the no-op unimplemented fields of a raw body; raises a validation error naming any other."""
    if not isinstance(data, dict):
        return data
    if data.get("top_logprobs") is not None and not data.get("logprobs"):
        raise PydanticCustomError("dependent_parameter", "{param}: needs 'logprobs': true",
                                  {"param": "top_logprobs"})
    for name, is_noop in table.items():
        if name in data and not is_noop(data[name]):
            raise PydanticCustomError(
                "unsupported_parameter", "{param}: this server does not implement it (got {value}); leave it out",
                {"param": name, "value": repr(data[name])[:80]})
    return {k: v for k, v in data.items() if k not in table}


class TextPart(_Body):
    type: Literal["text"]
    text: str


# Message fields this server does not implement -> the values that mean "not used" (accepted).
MESSAGE_UNIMPLEMENTED = {
    "name": lambda v: v is None, "tool_calls": _is_empty, "tool_call_id": lambda v: v is None,
    "function_call": lambda v: v is None, "refusal": lambda v: v is None, "audio": _is_empty,
}


class ChatMessage(_Strict):
    """One message. `content` parts are checked by `normalize_messages` (the Python API's rule, so the same
    message gets the same error everywhere, e.g. an image part)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unimplemented(cls, data):
        return _refuse_unimplemented(data, MESSAGE_UNIMPLEMENTED)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by chat and text completions."""

    model: str = Field("default", description='"default" or the id from GET /v1/models')
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False, description="0 = greedy (default 1.0)")
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    user: str | None = Field(None, description="accepted for compatibility; the user is the API key's")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extensions (as in vLLM and llama.cpp's server).
    top_k: int | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT)
    min_p: float | None = Field(None, ge=0.0, lt=1.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("dependent_parameter", "{param}: only allowed with 'stream': true",
                                      {"param": "stream_options"})
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)

    @model_validator(mode="before")
    @classmethod
    def _unimplemented(cls, data):
        return _refuse_unimplemented(data, CHAT_UNIMPLEMENTED)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="text or token ids (a list of prompts must hold exactly one)")

    @model_validator(mode="before")
    @classmethod
    def _unimplemented(cls, data):
        return _refuse_unimplemented(data, COMPLETION_UNIMPLEMENTED)


# The API's one name rule (zkv_mlx/names.py); pydantic's regex engine has no trailing-newline `$` quirk.
SESSION_NAME = f"^{NAME_PATTERN}$"


class SessionCreate(_Strict):
    name: str | None = Field(None, pattern=SESSION_NAME, description="default: a timestamp")
