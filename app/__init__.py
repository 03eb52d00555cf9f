"""The terminal chat app (`zkv-mlx chat`), shipped inside the package as zkv_mlx.app.

`make_app()` builds the app for the CLI and for tests alike; `run_tui()` runs it and closes the engine.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def make_app(model_factory: Callable[[], object], **options):
    """Builds the chat app.

    Args:
        model_factory: returns the loaded model (a `zkv_mlx.ZKV`, or anything with its methods, such as
            `zkv_mlx.app.fake.FakeZKV`); it runs in a worker thread while a loading screen shows.
        **options: what (name shown while loading), user, session, system, sampling (dict), stats_interval.
    Returns:
        A `ZkvChatApp`; `app.run()` returns the exit code.
    """
    from .chat_app import ZkvChatApp

    return ZkvChatApp(model_factory, **options)


def run_tui(model_factory: Callable[[], object], **options) -> int:
    """Runs the chat app in this terminal until the user quits.

    Returns:
        0, or 1 when the model could not be loaded (the error is printed to stderr as well).
    """
    app = make_app(model_factory, **options)
    code = app.run()
    if app.backend is not None:
        app.backend.close()
    if app.load_error:
        print(f"zkv-mlx: error: {app.load_error}", file=sys.stderr)
        return 1
    # A crash inside Textual ends run() with no return value but return_code 1: never report it as success.
    return code or app.return_code or 0


__all__ = ["make_app", "run_tui"]
