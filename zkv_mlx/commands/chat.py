"""`zkv-mlx chat`: the Textual app in a terminal, else (piped I/O or --plain) the line-based loop."""

from __future__ import annotations

import sys

from ..cli_common import open_model, sampling_kwargs


def run(args) -> int:
    if getattr(args, "session", None) is not None:
        from ..names import check_name

        check_name(args.session)  # the TUI and the plain loop refuse a bad name before the (slow) model load
    if args.plain or not (sys.stdin.isatty() and sys.stdout.isatty()):
        from ..chat_cli import run_chat

        return run_chat(args)
    from ..app import run_tui

    return run_tui(lambda: open_model(args), what=args.model or "the bundled model (SmolLM2-135M-Instruct)",
                   user=args.user, session=getattr(args, "session", None), system=args.system,
                   sampling=sampling_kwargs(args))
