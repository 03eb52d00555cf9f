"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, OutOfKVMemory, PromptTooLong, SessionError, ZkvError

log = logging.getLogger("zkv_mlx.server")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          429: "rate_limit_error", 501: "not_implemented_error"}


class APIError(Exception):
    """An error answered as JSON in OpenAI's shape with the given HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_engine_error(e: BaseException, prompt_param: str = "messages") -> APIError:
    """Maps an exception raised by (or reported from) the engine to an HTTP error."""
    if isinstance(e, PromptTooLong):
        return APIError(400, str(e), param=prompt_param, code="context_length_exceeded")
    if isinstance(e, (ConfigError, OutOfKVMemory, SessionError)):
        return APIError(400, str(e), code=type(e).__name__)
    if isinstance(e, ZkvError):
        return APIError(500, str(e), code=type(e).__name__)
    log.error("unexpected engine error", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}", code="internal_error")


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "bytes"}


def _validation_message(errors: list[dict]) -> tuple[str, str | None, str]:
    """(message, param, code) of pydantic's errors for a request body: the most telling one, field named."""
    # Of a union's alternatives, the deepest error that is not a plain type mismatch tells the most.
    err = max(errors, key=lambda e: (len(e.get("loc", ())), not str(e.get("type", "")).endswith("_type")))
    kind, ctx = str(err.get("type", "")), err.get("ctx") or {}
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {ctx.get('error', err.get('msg'))}", None, "invalid_json"
    # Drop "body" and pydantic's union-member tags ("str", "list[str]", "function-after[...]") from the path.
    loc = [str(p) for p in err.get("loc", ())[1:]
           if isinstance(p, int) or (str(p).isidentifier() and str(p) not in _TYPE_TAGS)]
    param = ".".join(loc) or None
    if kind in ("unsupported_parameter", "dependent_parameter"):  # raised by schemas.py, message names the field
        # inside a message, the path to it: "messages.1" + "name"
        full = ".".join(x for x in (param, ctx.get("param")) if x)
        msg = err.get("msg", kind)
        if param:
            msg = full + msg[len(ctx.get("param", "")):] if msg.startswith(str(ctx.get("param"))) else msg
        return msg, full or None, "unsupported_parameter" if kind[0] == "u" else "invalid_value"
    if kind == "extra_forbidden":
        return (f"{param}: unknown parameter; this server does not know it (docs/server.md lists the fields it "
                "implements)", param, "unknown_parameter")
    msg = err.get("msg", "invalid value")
    return f"{param or 'request body'}: {msg}", param, "invalid_type" if kind.endswith("_type") else "invalid_value"


def install_handlers(app: FastAPI) -> None:
    """Makes every error (bad JSON, validation, unknown route, bugs) an OpenAI-shaped JSON answer."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = list(e.errors())
        message, param, code = _validation_message(errors) if errors else ("invalid request", None, "invalid_value")
        return APIError(400, message, param=param, code=code).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None,
                        headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
        return APIError(500, f"internal error: {type(e).__name__}", code="internal_error").response()
