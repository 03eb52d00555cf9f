"""The FastAPI app: `create_app(model)` wires the endpoints around a loaded model."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from .. import __version__
from ..config import parse_size
from ..errors import ConfigError
from . import completions, sessions
from .auth import Auth
from .errors import install_handlers
from .guard import (DEFAULT_MAX_BODY, DEFAULT_MAX_UPLOAD, LOOPBACK_NAMES, KeyAndBodyGuard, OriginGuard,
                    check_host_name, normalize_origin)
from .state import ServerState, current_user, get_state

DESCRIPTION = ("OpenAI-compatible API of zkv-mlx. Errors are JSON: "
               '{"error": {"message", "type", "param", "code"}}. See docs/server.md.')


# The model, stats and health routes (completions and sessions have their own modules).
router = APIRouter()


@router.get("/v1/models", tags=["models"])
async def list_models(request: Request, user: str = Depends(current_user)):
    return {"object": "list", "data": [get_state(request).model_card()]}


@router.get("/v1/models/{model_id}", tags=["models"], responses={404: {"description": "unknown model"}})
async def get_model(model_id: str, request: Request, user: str = Depends(current_user)):
    """The loaded model; `default` names it too."""
    srv = get_state(request)
    srv.check_model(model_id)
    return srv.model_card()


@router.get("/v1/kv/stats", tags=["kv"])
async def kv_stats(request: Request, user: str = Depends(current_user)):
    """KV pool and prefix-cache statistics; `per_user` holds only the caller's own entry."""
    stats = dict(await run_in_threadpool(get_state(request).model.kv_cache_stats))
    per_user = stats.get("per_user")
    if isinstance(per_user, dict):
        stats["per_user"] = {user: per_user[user]} if user in per_user else {}
    stats["user"] = user
    return stats


@router.get("/health", tags=["health"])
async def health():
    return {"status": "ok"}


def create_app(model, api_keys: dict[str, str] | None = None, require_key: bool = False,
               max_queue: int = 64, *, allowed_hosts: list[str] | None = None,
               allowed_origins: list[str] = (), max_body: int | str = DEFAULT_MAX_BODY,
               max_upload: int | str = DEFAULT_MAX_UPLOAD) -> FastAPI:
    """Builds the OpenAI-compatible app around a loaded model.

    Args:
        model: a `zkv_mlx.ZKV` (the app uses only its public API; closing it is the caller's job).
        api_keys: key -> user (see `load_api_keys`); None accepts any or no key as the user "anonymous".
        require_key: answer 401 to requests without a known key.
        max_queue: requests in flight (waiting or generating) before new ones are answered 429.
        allowed_hosts: names accepted in the `Host` header besides localhost, 127.0.0.1 and ::1 (421 for any
            other, against DNS rebinding); ["*"] accepts any (a server bound to the network).
        allowed_origins: browser front ends (scheme://host[:port]) whose POST/DELETE requests are accepted and
            that get CORS answers; other origins get 403.
        max_body: bytes (or a size like "8MB") a request body may hold; 413 beyond.
        max_upload: the same for session uploads (POST /v1/sessions/import).
    Returns:
        The app, to run with uvicorn.
    Raises:
        ConfigError: for a bad limit, origin or host name.
    """
    if not isinstance(max_queue, int) or max_queue < 1:
        raise ConfigError(f"max_queue: {max_queue!r} must be an integer >= 1")
    max_body, max_upload = parse_size(max_body, "--max-body"), parse_size(max_upload, "--max-upload")
    origins = frozenset(normalize_origin(o).lower() for o in allowed_origins)
    hosts = ["*" if h == "*" else check_host_name(h) for h in (allowed_hosts or [])]
    app = FastAPI(title="zkv-mlx", version=__version__, description=DESCRIPTION)
    auth = Auth(api_keys, require_key)
    app.state.zkv = ServerState(model, auth, max_queue)
    install_handlers(app)
    # Added innermost first: the Host/Origin check runs first, CORS answers preflights, then key and body.
    app.add_middleware(KeyAndBodyGuard, auth=auth, max_body=max_body, max_upload=max_upload)
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=sorted(origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(OriginGuard, origins=origins,
                       hosts=None if "*" in hosts else LOOPBACK_NAMES | set(hosts))
    app.include_router(completions.router)
    app.include_router(sessions.router)

    app.include_router(router)
    return app
