"""Request bodies of the OpenAI-compatible endpoints (the subset zkv-mlx serves; unknown fields are ignored)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# mx.random.key takes an unsigned 64-bit seed; OpenAI's seed is a signed 64-bit integer.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_TOKENS_LIMIT = 2**31 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by chat and text completions."""

    model: str = Field("default", description='"default" or the id from GET /v1/models')
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy (default 1.0)")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    user: str | None = Field(None, description="accepted for compatibility; the user is the API key's")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    presence_penalty: float | None = Field(None, ge=0.0, le=0.0, description="not supported (0 only)")
    frequency_penalty: float | None = Field(None, ge=0.0, le=0.0, description="not supported (0 only)")
    # Extensions (as in vLLM and llama.cpp's server).
    top_k: int | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT)
    min_p: float | None = Field(None, ge=0.0, lt=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: Literal[False] | None = Field(None, description="not supported")


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="text or token ids (a list of prompts must hold exactly one)")
    echo: Literal[False] | None = Field(None, description="not supported")
    suffix: None = Field(None, description="not supported")
    logprobs: None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1)


SESSION_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class SessionCreate(_Body):
    name: str | None = Field(None, pattern=SESSION_NAME, description="default: a timestamp")
