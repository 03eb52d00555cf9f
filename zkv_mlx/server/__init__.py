"""OpenAI-compatible HTTP server (`zkv-mlx serve`), built only on the public API (`zkv_mlx.api`)."""

from .app import create_app
from .auth import ANONYMOUS, load_api_keys
from .run import serve

__all__ = ["ANONYMOUS", "create_app", "load_api_keys", "serve"]
