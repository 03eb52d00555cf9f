"""API keys -> users. The file is JSON or TOML mapping each key to a user name (see docs/server.md)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from ..errors import ConfigError
from .errors import APIError

ANONYMOUS = "anonymous"


def load_api_keys(path: str | Path) -> dict[str, str]:
    """Reads an API-keys file.

    Args:
        path: a .json or .toml file whose top level maps key -> user, e.g. {"sk-alice-1": "alice"}.
    Returns:
        The mapping key -> user.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--api-keys {path}: cannot read the file ({e.strerror or e})") from None
    try:
        data = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        kind = "TOML" if p.suffix.lower() == ".toml" else "JSON (name the file *.toml for TOML)"
        raise ConfigError(f"--api-keys {path}: not valid {kind}: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f'--api-keys {path}: expected a non-empty mapping of key -> user, e.g. {{"sk-1": "alice"}}')
    for key, user in data.items():
        if not key.strip() or not isinstance(user, str) or not user.strip():
            raise ConfigError(f"--api-keys {path}: entry {key!r} = {user!r}: keys and users must be non-empty strings")
    return {k: v for k, v in data.items()}


class Auth:
    """Resolves the user of a request from its bearer token.

    Args:
        keys: key -> user, or None to accept any (or no) key as the anonymous user.
        require_key: answer 401 to requests without a key.
    """

    def __init__(self, keys: dict[str, str] | None = None, require_key: bool = False):
        if require_key and not keys:
            raise ConfigError("--require-key needs --api-keys FILE (no key could ever be accepted)")
        self.keys = dict(keys or {})
        self.require_key = require_key

    def user(self, token: str | None) -> str:
        """The user of a request with bearer `token` (None if no Authorization header); raises APIError 401."""
        if token and self.keys:
            user = self.keys.get(token)
            if user is None:
                raise APIError(401, "incorrect API key provided", code="invalid_api_key")
            return user
        if not token and self.require_key:
            raise APIError(401, "this server requires an API key: send 'Authorization: Bearer KEY'",
                           code="missing_api_key")
        return ANONYMOUS
