"""The FastAPI app: `create_app(model)` wires the endpoints around a loaded model."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import ConfigError
from . import completions, sessions
from .auth import Auth
from .errors import install_handlers
from .state import ServerState, current_user, get_state

DESCRIPTION = ("OpenAI-compatible API of zkv-mlx. Errors are JSON: "
               '{"error": {"message", "type", "param", "code"}}. See docs/server.md.')


def create_app(model, api_keys: dict[str, str] | None = None, require_key: bool = False,
               max_queue: int = 64) -> FastAPI:
    """Builds the OpenAI-compatible app around a loaded model.

    Args:
        model: a `zkv_mlx.ZKV` (the app uses only its public API; closing it is the caller's job).
        api_keys: key -> user (see `load_api_keys`); None accepts any or no key as the user "anonymous".
        require_key: answer 401 to requests without a known key.
        max_queue: requests in flight (waiting or generating) before new ones are answered 429.
    Returns:
        The app, to run with uvicorn.
    """
    if not isinstance(max_queue, int) or max_queue < 1:
        raise ConfigError(f"max_queue: {max_queue!r} must be an integer >= 1")
    app = FastAPI(title="zkv-mlx", version=__version__, description=DESCRIPTION)
    app.state.zkv = ServerState(model, Auth(api_keys, require_key), max_queue)
    install_handlers(app)
    app.include_router(completions.router)
    app.include_router(sessions.router)

    @app.get("/v1/models", tags=["models"])
    async def list_models(request: Request, user: str = Depends(current_user)):
        return {"object": "list", "data": [get_state(request).model_card()]}

    @app.get("/v1/models/{model_id}", tags=["models"], responses={404: {"description": "unknown model"}})
    async def get_model(model_id: str, request: Request, user: str = Depends(current_user)):
        """The loaded model; `default` names it too."""
        srv = get_state(request)
        srv.check_model(model_id)
        return srv.model_card()

    @app.get("/v1/kv/stats", tags=["kv"])
    async def kv_stats(request: Request, user: str = Depends(current_user)):
        """KV pool and prefix-cache statistics; `per_user` holds only the caller's own entry."""
        stats = dict(await run_in_threadpool(get_state(request).model.kv_cache_stats))
        per_user = stats.get("per_user")
        if isinstance(per_user, dict):
            stats["per_user"] = {user: per_user[user]} if user in per_user else {}
        stats["user"] = user
        return stats

    @app.get("/health", tags=["health"])
    async def health():
        return {"status": "ok"}

    return app
