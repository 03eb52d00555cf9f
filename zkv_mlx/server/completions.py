"""POST /v1/chat/completions and /v1/completions: prompt -> engine request -> JSON, or SSE when streaming."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from .bridge import EventStream
from .errors import APIError, from_engine_error
from ..errors import MessageError
from ..api import normalize_messages
from .schemas import ChatCompletionRequest, CompletionRequest
from .state import ServerState, current_user, get_state

router = APIRouter(tags=["completions"])

ERRORS = {code: {"description": desc} for code, desc in
          [(400, "invalid request"), (401, "missing or unknown API key"), (404, "unknown model"),
           (429, "too many requests in flight")]}
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@router.post("/v1/chat/completions", responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, user: str = Depends(current_user)):
    """Replies to a conversation rendered with the model's chat template."""
    srv = get_state(request)
    srv.check_model(body.model)
    try:  # the same normalisation as the Python API; content stays plain text (no control-token opt-out here)
        messages = normalize_messages([m.model_dump() for m in body.messages])
    except MessageError as e:
        raise APIError(400, str(e), param="messages", code="invalid_messages") from None
    try:
        ids = await run_in_threadpool(srv.model.tokenizer.encode_chat, messages)
    except Exception as e:  # a template that rejects the conversation, text that cannot be encoded
        raise APIError(400, f"cannot render the conversation with the model's chat template: {e}",
                       param="messages", code="invalid_messages") from None
    max_tokens = body.max_completion_tokens or body.max_tokens or max(1, srv.max_context - len(ids))
    return await _respond(request, srv, body, ids, user, max_tokens, chat=True)


@router.post("/v1/completions", responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, user: str = Depends(current_user)):
    """Continues a raw prompt (text or token ids; no chat template)."""
    srv = get_state(request)
    srv.check_model(body.model)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"prompt: {len(prompt)} prompts in one request; send one prompt per request",
                           param="prompt", code="invalid_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        try:
            ids = await run_in_threadpool(srv.model.tokenizer.encode, prompt)
        except Exception as e:
            raise APIError(400, f"prompt: cannot tokenize the text: {e}", param="prompt",
                           code="invalid_value") from None
    else:
        bad = [t for t in prompt if not 0 <= t < srv.vocab_size]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0..{srv.vocab_size - 1})",
                           param="prompt", code="invalid_value")
        ids = list(prompt)
    return await _respond(request, srv, body, ids, user, body.max_tokens or COMPLETIONS_MAX_TOKENS, chat=False)


def _sampling(body, max_tokens: int) -> dict:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return {
        "max_tokens": max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,  # OpenAI's default
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "seed": None if body.seed is None else body.seed % 2**64,  # negative seeds as their uint64 bits
        "stop": stop,
    }


async def _respond(request: Request, srv: ServerState, body, ids: list[int], user: str, max_tokens: int,
                   chat: bool) -> Response:
    if not srv.slots.try_acquire():
        n = srv.slots.limit
        raise APIError(429, f"the server is busy: {n} requests in flight (--max-queue {n}); retry shortly",
                       code="rate_limit_exceeded", headers={"Retry-After": "1"})
    try:
        handle = srv.model.submit(ids, user=user, **_sampling(body, max_tokens))
    except Exception as e:
        srv.slots.release()
        raise from_engine_error(e) from None
    events = EventStream(handle, on_end=srv.slots.release)
    fmt = _Format(srv, chat)
    # Wait for the first event before answering, so a rejected prompt is a clean 400 even when streaming.
    first, gone = await _unless_disconnected(request, events.next())
    if gone:
        events.cancel()
        return Response(status_code=499)
    if first.kind == "error":
        raise from_engine_error(first.error, "messages" if chat else "prompt")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _SSEResponse(_sse(events, first, fmt, include_usage), events)
    result, gone = await _unless_disconnected(request, _collect(events, first))
    if gone:
        events.cancel()
        return Response(status_code=499)
    text, last = result
    if last.kind == "error":
        raise from_engine_error(last.error)
    return fmt.completion(text, last)


async def _collect(events: EventStream, ev):
    parts = []
    while ev.kind == "token":
        parts.append(ev.text)
        ev = await events.next()
    return "".join(parts), ev


async def _unless_disconnected(request: Request, coro):
    """Awaits coro unless the client goes away first; returns (result, client_gone)."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work.done():
        return work.result(), False
    work.cancel()
    return None, True


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next message is the disconnect (or the end of the response).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(events: EventStream, ev, fmt: "_Format", include_usage: bool):
    if fmt.chat:
        yield _data(fmt.chunk({"role": "assistant", "content": ""}))
    while ev.kind == "token":
        if ev.text:
            yield _data(fmt.chunk({"content": ev.text} if fmt.chat else ev.text))
        ev = await events.next()
    if ev.kind == "error":
        yield _data(from_engine_error(ev.error).body())
        return
    yield _data(fmt.chunk({} if fmt.chat else "", finish_reason=_finish_reason(ev)))
    if include_usage:
        yield _data({**fmt.chunk_base(), "choices": [], "usage": _usage(ev.usage)})
    yield "data: [DONE]\n\n"


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _SSEResponse(StreamingResponse):
    """A server-sent-events stream that cancels its engine request when it ends early (client gone)."""

    def __init__(self, content, events: EventStream):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.events.cancel()


def _finish_reason(ev) -> str:
    return ev.finish_reason if ev.finish_reason in ("stop", "length") else "stop"


def _usage(u: dict) -> dict:
    p, c = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": int(u.get("cached_tokens") or 0)}}


class _Format:
    """OpenAI's response objects for one request (chat.completion[.chunk] or text_completion)."""

    def __init__(self, srv: ServerState, chat: bool):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = srv.model_id
        self.fingerprint = srv.fingerprint

    def chunk_base(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint}

    def chunk(self, delta, finish_reason: str | None = None) -> dict:
        choice = ({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason} if self.chat
                  else {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason})
        return {**self.chunk_base(), "choices": [choice]}

    def completion(self, text: str, done) -> dict:
        reason = _finish_reason(done)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": reason} if self.chat
                  else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint,
                "choices": [choice], "usage": _usage(done.usage)}
