"""Request guards that run before any endpoint: who may reach the server (Host, Origin) and what it reads.

`OriginGuard` stops web pages from driving a loopback server: DNS rebinding (a foreign `Host`) and cross-site
form or fetch POSTs (a foreign `Origin`, `Sec-Fetch-Site: cross-site`). `KeyAndBodyGuard` checks the API key
before a single body byte is read and caps request bodies (413). Both are plain ASGI middleware, so they answer
before FastAPI parses anything.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from ..errors import ConfigError
from .auth import Auth
from .errors import APIError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
UPLOAD_PATH = "/v1/sessions/import"
UPLOAD_TYPE = "application/octet-stream"
DEFAULT_MAX_BODY = 8 << 20  # bytes; a chat request near any model's context fits many times over
DEFAULT_MAX_UPLOAD = 64 << 30  # bytes; a session file holds K/V, so it can be large


def is_loopback(host: str) -> bool:
    """True if `host` (a bind address or host name) only reaches this machine."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host_name(name) -> str:
    """An `--allow-host` value as compared with `Host` headers: lower case, no brackets; raises ConfigError for a
    value with a scheme, path or port (the guard accepts any port)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"--allow-host {name!r}: give a host name, e.g. myhost.local")
    bare = name.strip().strip("[]").lower()
    try:
        ipaddress.ip_address(bare)
        return bare
    except ValueError:
        pass
    if any(c in bare for c in "/:@ ") or bare.startswith("."):
        raise ConfigError(f"--allow-host {name!r}: give the host name only, without scheme, port or path "
                          f"(any port is accepted), e.g. --allow-host {urlsplit('//' + bare).hostname or 'myhost.local'}")
    return bare


def normalize_origin(url: str) -> str:
    """`scheme://host[:port]` of a front end's URL, as browsers send it in `Origin`; raises ConfigError."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"--allow-origin {url!r}: not a URL ({e}); use e.g. http://localhost:3000") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"--allow-origin {url!r}: give the front end's origin only, scheme://host[:port], "
                          "e.g. http://localhost:3000")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _host_name(host: str) -> str:
    """The name in a `Host` header ("[::1]:8080" -> "::1"), lower case; "" if malformed."""
    try:
        parts = urlsplit("//" + host)
        parts.port  # noqa: B018  (raises on a malformed port)
        return (parts.hostname or "").lower()
    except ValueError:
        return ""


async def _answer(scope, receive, send, error: APIError) -> None:
    await error.response()(scope, receive, send)


class OriginGuard:
    """Refuses foreign `Host` values (when `allowed_hosts` is not None) and state-changing requests from foreign
    origins.

    Args:
        app: the ASGI app to guard.
        hosts: host names (no port) accepted in `Host`, lower case; None accepts any (a server bound to
            the network, where `Host` is whatever name clients use).
        origins: normalized, lower-case origins (see `normalize_origin`) whose POST/PUT/PATCH/DELETE are accepted,
            besides the server's own origin (what its /docs page sends).
    """

    def __init__(self, app, hosts: frozenset[str] | None, origins: frozenset[str]):
        self.app = app
        self.allowed_hosts = hosts
        self.allowed_origins = origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = _header(scope, b"host")
        if host is not None and self.allowed_hosts is not None:
            if _host_name(host) not in self.allowed_hosts:
                names = ", ".join(sorted(f"[{h}]" if ":" in h else h for h in self.allowed_hosts))
                return await _answer(scope, receive, send, APIError(
                    421, f"Host {host!r} is not served here: this server answers only to {names} (any port); "
                         "to add a name, start it with --allow-host NAME (create_app(allowed_hosts=[NAME]))",
                    code="host_not_allowed"))
        if scope["method"] == "OPTIONS" and _header(scope, b"access-control-request-method") is not None:
            origin = _header(scope, b"origin")
            if origin is not None and origin.lower() not in self.allowed_origins:
                return await _answer(scope, receive, send, APIError(  # JSON, not CORS middleware's text/plain
                    403, f"CORS preflight from origin {origin!r} refused; to serve a browser front end there, start "
                         f"the server with --allow-origin {origin}", code="origin_not_allowed"))
        if scope["method"] in STATE_CHANGING:
            origin = _header(scope, b"origin")
            if origin is not None:
                own = host is not None and origin.lower() in (f"http://{host}".lower(), f"https://{host}".lower())
                if not own and origin.lower() not in self.allowed_origins:
                    fix = ("serve the front end from an http(s) origin and start the server with --allow-origin "
                           "URL" if origin == "null" else f"start the server with --allow-origin {origin} "
                           f"(create_app(allowed_origins=[{origin!r}]))")
                    return await _answer(scope, receive, send, APIError(
                        403, f"requests from origin {origin!r} are refused; to serve a browser front end there, "
                             f"{fix}", code="origin_not_allowed"))
            elif (_header(scope, b"sec-fetch-site") or "").lower() == "cross-site":
                return await _answer(scope, receive, send, APIError(
                    403, "cross-site requests without an Origin are refused", code="origin_not_allowed"))
        await self.app(scope, receive, send)


class KeyAndBodyGuard:
    """Checks the API key of /v1/ requests before reading their body, then caps the body.

    Args:
        app: the ASGI app to guard.
        auth: resolves (or refuses, 401) the bearer token.
        max_body: bytes a request body may hold (413 beyond).
        max_upload: bytes a session upload (POST /v1/sessions/import) may hold; its body must be
            `application/octet-stream`.
    """

    def __init__(self, app, auth: Auth, max_body: int, max_upload: int):
        self.app = app
        self.auth = auth
        self.max_body = max_body
        self.max_upload = max_upload

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path.startswith("/v1/"):
            scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
            try:
                self.auth.user(token.strip() if scheme.lower() == "bearer" and token.strip() else None)
            except APIError as e:
                return await _answer(scope, receive, send, e)
        upload = path == UPLOAD_PATH and scope["method"] == "POST"
        limit, what = (self.max_upload, "--max-upload") if upload else (self.max_body, "--max-body")
        too_large = APIError(413, f"the request body is larger than the server's limit of {limit} bytes "
                                  f"({what}); send less, or raise {what} when starting the server",
                             code="request_too_large")
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            return await _answer(scope, receive, send, too_large)
        if upload:
            ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if ctype != UPLOAD_TYPE:
                return await _answer(scope, receive, send, APIError(
                    415, f"a session upload must be sent as Content-Type: {UPLOAD_TYPE} (got {ctype or 'none'!r})",
                    param="Content-Type", code="unsupported_media_type"))
            return await self.app(scope, _Capped(receive, limit, too_large), send)
        # Small bodies are read here whole, so that going over the cap is a clean 413 and not a parse error.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away mid-body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _answer(scope, receive, send, too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _Replay(b"".join(chunks), receive), send)


class _Replay:
    """A `receive` that hands over the already-read body once, then the connection's own messages."""

    def __init__(self, body: bytes, receive):
        self.body, self.receive = body, receive

    async def __call__(self):
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        return await self.receive()


class _Capped:
    """A `receive` that raises `error` (413) once more than `limit` body bytes arrived."""

    def __init__(self, receive, limit: int, error: APIError):
        self.receive, self.limit, self.error, self.size = receive, limit, error, 0

    async def __call__(self):
        message = await self.receive()
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            if self.size > self.limit:
                raise self.error
        return message
