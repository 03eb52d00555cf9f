"""A plain line-based chat loop (the Textual TUI replaces it as `zkv-mlx chat`)."""

from __future__ import annotations

import sys
import time


def run_chat(args) -> int:
    from .cli_common import open_model, sampling_kwargs
    from .errors import PromptTooLong
    from .names import check_name

    name = getattr(args, "session", None)
    if name is not None:
        check_name(name)  # a bad name fails before the (slow) model load
    print("zkv-mlx chat: loading the model...", file=sys.stderr, flush=True)
    model = open_model(args)
    try:
        session = None if name is None else _open_or_create(model, name, args.user)
    except BaseException:
        model.close()  # distributed: rank 0 ends the other ranks cleanly before reporting why
        raise
    info = model.info
    print(f"model: {info['model']} ({info['weights']} weights, {info['kv_blocks']} KV blocks of {info['block_size']})",
          file=sys.stderr)
    print(banner(getattr(args, "distributed", None) is not None), file=sys.stderr, flush=True)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                break
            if text == "/reset":
                messages = messages[:1] if args.system else []
                if session is not None:
                    session.clear()
                print("(conversation cleared)")
                continue
            if text == "/stats":
                for k, v in model.kv_cache_stats().items():
                    print(f"  {k}: {v}")
                continue
            messages.append({"role": "user", "content": text})
            sys.stdout.write("assistant> ")
            t0 = time.perf_counter()
            reply, n = [], 0
            try:
                stream = session.chat(_turn(session, messages, text), stream=True, **sampling_kwargs(args)) \
                    if session is not None else \
                    model.chat(messages, stream=True, user=args.user, **sampling_kwargs(args))
                for chunk in stream:
                    reply.append(chunk)
                    n += 1
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                sys.stdout.write(" [stopped]")
            except PromptTooLong as e:  # this turn only: the conversation goes on without the message
                sys.stdout.write("\n")
                print(f"zkv-mlx: error: {e} (the message was not sent; send a shorter one, or /reset to start "
                      "over)", file=sys.stderr, flush=True)
                messages.pop()
                continue
            dt = time.perf_counter() - t0
            sys.stdout.write("\n")  # the reply's own line, also when stdout is a file
            print(f"({n} chunks in {dt:.1f}s)", file=sys.stderr)
            messages.append({"role": "assistant", "content": "".join(reply)})
    finally:
        model.close()
    return 0


def banner(distributed: bool) -> str:
    """The help line; under mlx.launch (--distributed) Ctrl-D does not end the loop (stdin stays open)."""
    return f"Type a message and press Enter. Commands: /reset, /stats, {'/quit' if distributed else '/quit (or Ctrl-D)'}."


def _turn(session, messages: list[dict], text: str):
    """What a session's next turn sends: the system prompt too when the session is still empty."""
    return messages[-2:] if not session.messages and messages[0]["role"] == "system" else text


def _open_or_create(model, name: str, user: str | None):
    """The named session, opened or created: each turn is kept, and saved when the model closes."""
    from .api import SessionError

    try:
        session = model.open_session(name, user=user)
    except SessionError as e:
        if not str(e).startswith("no session named"):
            # it exists but cannot be opened (corrupt, another model or KV format), or this run cannot keep
            # sessions (distributed): say why, naming the flag
            raise SessionError(f"--session {name}: {e}") from None
        session = model.create_session(name, user=user)
    print(f"session: {name} ({len(session.messages)} messages so far)", file=sys.stderr)
    return session
