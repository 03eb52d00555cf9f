"""zkv-mlx: a KV-cache engine for local LLM inference with MLX."""

from . import _blas

_blas.preload()  # before anything imports mlx.core

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import zkv_mlx` (e.g. for the CLI's --help) does not pay for mlx imports.
    if name == "ZKV":
        from .api import ZKV

        return ZKV
    if name == "Session":
        from .api import Session

        return Session
    raise AttributeError(name)


__all__ = ["ZKV", "__version__"]
