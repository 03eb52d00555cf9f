"""What every endpoint needs: the model, who is asking, and the bound on requests in flight."""

from __future__ import annotations

import asyncio
import time

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .auth import Auth
from .bridge import Slots
from .errors import APIError

DEFAULT_MODEL = "default"


class ServerState:
    """Per-app state, kept on `app.state.zkv`.

    Args:
        model: a `ZKV` (or anything with its public methods).
        auth: resolves users from bearer tokens.
        max_queue: requests in flight (waiting or generating) before new ones get 429.
    """

    def __init__(self, model, auth: Auth, max_queue: int):
        self.model = model
        self.auth = auth
        self.slots = Slots(max_queue)
        self.session_lock = asyncio.Lock()  # serializes session creation (name checks, then the name is taken)
        info = model.info
        self.model_id = str(info.get("model") or DEFAULT_MODEL)
        self.fingerprint = info.get("fingerprint")
        self.max_context = int(info["max_context"])
        self.vocab_size = int(model.tokenizer.vocab_size)
        self.created = int(time.time())

    def check_model(self, name: str | None) -> None:
        """Accepts "default" and the loaded model's id; anything else is a 404 as OpenAI answers it."""
        if name not in (None, DEFAULT_MODEL, self.model_id):
            raise APIError(404, f"the model {name!r} does not exist; this server has {self.model_id!r} "
                                f"(also reachable as {DEFAULT_MODEL!r})", param="model", code="model_not_found")

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "zkv-mlx"}


def get_state(request: Request) -> ServerState:
    return request.app.state.zkv


_bearer = HTTPBearer(auto_error=False, description="an API key from the server's --api-keys file")


async def current_user(request: Request,
                       cred: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> str:
    """The user this request acts for: the API key's user, else "anonymous" (401 when a key is required)."""
    return get_state(request).auth.user(cred.credentials if cred else None)
