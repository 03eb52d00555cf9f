"""Sessions over HTTP: list, create, info, delete, export (download) and import (upload).

Every call passes the caller as `user`, so a user sees and touches only their own sessions (design.md §6).
A model without sessions (no `create_session`) answers 501 in OpenAI's error shape.
"""

from __future__ import annotations

import os
import tempfile

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .errors import APIError, from_engine_error, log
from .schemas import SESSION_NAME, SessionCreate
from .state import current_user, get_state

router = APIRouter(tags=["sessions"])
ERRORS = {code: {"description": desc} for code, desc in
          [(400, "invalid request"), (401, "missing or unknown API key"), (404, "no such session"),
           (501, "this zkv-mlx has no sessions")]}
SUFFIX = ".zkvs"


def _model(request: Request):
    model = get_state(request).model
    if not hasattr(model, "create_session"):
        raise APIError(501, "sessions are not available in this version of zkv-mlx", code="sessions_unavailable")
    return model


async def _call(fn, *args, **kwargs):
    """Runs a (blocking) session call on a worker thread; its errors become HTTP errors."""
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except APIError:
        raise
    except Exception as e:
        raise from_engine_error(e) from None


def _info(s) -> dict:
    return dict(s.info() if hasattr(s, "info") else s)


def _find(model, name: str, user: str) -> dict:
    """The caller's session `name` (404 if they have none: other users' sessions do not exist for them)."""
    for info in model.list_sessions(user=user):
        if _info(info).get("name") == name:
            return _info(info)
    raise APIError(404, f"no session named {name!r}", param="name", code="session_not_found")


def _export(model, name: str, user: str, path: str) -> None:
    _find(model, name, user)
    # By name only: load_session would read a name that is also a file in the working directory as that file.
    model.open_session(name, user=user).export(path)


@router.get("/v1/sessions", responses=ERRORS)
async def list_sessions(request: Request, user: str = Depends(current_user)):
    """The caller's sessions (open ones and those saved on disk)."""
    model = _model(request)
    return {"object": "list", "data": [_info(s) for s in await _call(model.list_sessions, user=user)]}


@router.post("/v1/sessions", responses=ERRORS)
async def create_session(request: Request, body: SessionCreate | None = None, user: str = Depends(current_user)):
    """Creates an (empty) session owned by the caller."""
    model = _model(request)
    # One at a time: ZKV picks a free (default) name and then takes it, which must not interleave.
    async with get_state(request).session_lock:
        session = await _call(model.create_session, name=body.name if body else None, user=user)
    return _info(session)


@router.get("/v1/sessions/{name}", responses=ERRORS)
async def session_info(name: str, request: Request, user: str = Depends(current_user)):
    return await _call(_find, _model(request), name, user)


@router.delete("/v1/sessions/{name}", responses=ERRORS)
async def delete_session(name: str, request: Request, user: str = Depends(current_user)):
    """Deletes the session and its file."""
    model = _model(request)
    await _call(_find, model, name, user)
    await _call(model.delete_session, name, user=user)
    return {"id": name, "object": "session.deleted", "deleted": True}


@router.get("/v1/sessions/{name}/export", responses=ERRORS)
async def export_session(name: str, request: Request, user: str = Depends(current_user)):
    """Downloads the session as a portable session file (docs/session-format.md)."""
    model = _model(request)
    fd, tmp = tempfile.mkstemp(prefix="zkv-export-", suffix=SUFFIX)
    os.close(fd)
    try:
        await _call(_export, model, name, user, tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return FileResponse(tmp, media_type="application/octet-stream", filename=name + SUFFIX,
                        background=BackgroundTask(os.unlink, tmp))


@router.post("/v1/sessions/import", responses={**ERRORS, 413: {"description": "larger than --max-upload"},
                                                415: {"description": "not application/octet-stream"}},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def import_session(request: Request, user: str = Depends(current_user),
                         name: str | None = Query(None, pattern=SESSION_NAME,
                                                  description="store it under this name (default: the file's)")):
    """Uploads a session file (the request body is the file's bytes, Content-Type application/octet-stream;
    the size limit is the server's --max-upload); the session becomes the caller's."""
    model = _model(request)
    fd, tmp = tempfile.mkstemp(prefix="zkv-import-", suffix=SUFFIX)
    try:
        size = 0
        with os.fdopen(fd, "wb") as f:
            try:
                async for chunk in request.stream():  # guard.py ends it with a 413 past --max-upload
                    size += len(chunk)
                    f.write(chunk)
            except ClientDisconnect:
                log.warning("session upload by %s: the client disconnected after %d bytes; nothing imported",
                            user, size)
                return Response(status_code=499)  # nobody reads it; uvicorn drops it
        if size == 0:
            raise APIError(400, "the request body is empty; send the session file's bytes", code="invalid_value")
        try:
            return _info(await _call(model.import_session, tmp, name=name, user=user))
        except APIError as e:  # the server's temp path means nothing to the client
            e.message = e.message.replace(tmp, "the uploaded session file")
            e.args = (e.message,)
            raise
    finally:
        os.unlink(tmp)
