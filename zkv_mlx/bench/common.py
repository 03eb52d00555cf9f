"""Shared helpers for benchmarks: machine description, bench text, JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import sys


def machine() -> dict:
    """A short description of where the figures were measured."""
    import os

    import mlx.core as mx

    from .. import _blas, sysinfo

    return {
        "platform": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "backend": sysinfo.backend(),
        "blas": "openblas" if _blas.loaded_path else "mlx-builtin",
        "mlx": mx.__version__,
    }


def bench_tokens(tokenizer, n: int) -> list[int]:
    """n token ids of real English text (the standard library's pydoc topics, present offline everywhere)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def median(xs):
    return statistics.median(xs) if xs else None


def log(args, msg: str) -> None:
    """Progress goes to stderr so stdout stays JSON."""
    print(msg, file=sys.stderr, flush=True)


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)
