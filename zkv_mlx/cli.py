"""`zkv-mlx` command line: generate, chat, stats, serve, sessions, doctor, bench, eval.

The parser lives here; each verb's code is its own module (`zkv_mlx/commands/`, `server`, `doctor`, `bench`,
`eval`), imported only when that verb runs (as in mlx-lm's cli.py), so the verbs never import each other or this
module. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .cli_common import (add_engine_flags, add_policy_flags, add_sampling_flags, engine_kwargs,  # noqa: F401
                         open_model, sampling_kwargs)
from .kv_presets import KV_PRESETS


def verb(target: str):
    """A `func` default that imports "module:function" (relative to zkv_mlx) only when the verb runs."""
    module, _, function = target.partition(":")

    def run(args) -> int:
        return getattr(importlib.import_module("zkv_mlx." + module), function)(args)

    run.target = target
    return run


def add_kv_quality_commands(sub, bsub) -> None:
    """`eval ppl` and `bench kvmem` (quantized KV cache)."""
    b = bsub.add_parser("kvmem", help="KV bytes per token (all layers, scales included) per format vs fp16")
    b.add_argument("--json", action="store_true", help="print only JSON lines (the last one is the result)")
    b.add_argument("--model", "-m", default=None)
    b.add_argument("--block-size", type=int, default=None)
    b.add_argument("--kv-group-size", type=int, default=None, choices=[32, 64])
    b.set_defaults(func=verb("bench.kvmem:run"))
    b = bsub.add_parser("kvwindow", help="KV bytes held for one long conversation on a Gemma-3-like plan: "
                                         "window-sized sliding-window layers vs all layers global")
    b.add_argument("--json", action="store_true", help="print only JSON lines (the last one is the result)")
    b.add_argument("--context", type=int, default=32768, help="conversation length in tokens")
    b.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    b.add_argument("--kv-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    b.add_argument("--baseline", default="derived", choices=["derived", "run"],
                   help="all-global bytes from the windowed run's logical blocks (derived) or a second run")
    b.set_defaults(func=verb("bench.kvwindow:run"))
    p = sub.add_parser("eval", help="quality evaluations")
    esub = p.add_subparsers(dest="eval", metavar="EVAL", required=True)
    e = esub.add_parser("ppl", help="perplexity and KL of a quantized KV cache or a long-context policy vs the "
                                    "full-precision full cache")
    e.add_argument("--kv-quant", default=None, choices=["none", *KV_PRESETS],
                   help="format evaluated (default int4, or none with --kv-policy)")
    e.add_argument("--kv-group-size", type=int, default=None, choices=[32, 64])
    e.add_argument("--kv-key-layout", default="auto", choices=["auto", "channel", "token"])
    e.add_argument("--kv-sinks", type=int, default=4, help="full-precision keys of the first positions (int4)")
    e.add_argument("--block-size", type=int, default=None)
    e.add_argument("--text", default=None, help="UTF-8 text file (default: the standard library's pydoc topics)")
    e.add_argument("--context", type=int, default=1024, help="tokens per window")
    e.add_argument("--windows", type=int, default=4, help="windows evaluated (from the start of the text)")
    e.add_argument("--chunk", type=int, default=128, help="prefill chunk: later chunks read the stored pages "
                                                             "(with --kv-policy: at most the policy's chunk)")
    e.add_argument("--kv-policy", default=None, choices=["full", "window", "h2o"],
                   help="evaluate a long-context policy instead of a KV format")
    e.add_argument("--budget", type=int, default=None, help="policy budget in tokens")
    e.add_argument("--sinks", type=int, default=4, help="policy sink tokens (0 = plain truncation for window)")
    e.add_argument("--h2o-recent", type=int, default=None, help="h2o: recent tokens kept (default one block)")
    e.add_argument("--compare", action="store_true",
                   help="with --kv-policy: also report window without sinks (truncation), window and h2o")
    e.add_argument("--vs-mlx-lm", action="store_true", help="also mlx-lm's QuantizedKVCache at the same bits/group")
    e.add_argument("--model", "-m", default=None)
    e.add_argument("--weights-dtype", default=None, choices=["auto", "float32", "float16", "bfloat16", "quantized"])
    e.add_argument("--json", action="store_true", help="print only the JSON result line")
    e.set_defaults(func=verb("eval.ppl:run"))


def _add_run_verbs(sub) -> None:
    """generate, chat, stats."""
    p = sub.add_parser("generate", help="answer (chat models) or continue (--raw) a prompt, streaming to stdout")
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--raw", action="store_true", help="continue the text as is, without the chat template")
    p.add_argument("--user", default=None)
    add_engine_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=verb("commands.generate:run"))

    p = sub.add_parser("chat", help="chat with the model in the terminal")
    p.add_argument("--user", default=None)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--session", default=None, help="open (or create) this named session")
    p.add_argument("--plain", action="store_true",
                   help="line-based chat instead of the terminal app (also used when stdin/stdout is not a TTY)")
    add_engine_flags(p)
    add_sampling_flags(p, max_tokens=512)
    p.set_defaults(func=verb("commands.chat:run"))

    p = sub.add_parser("stats", help="KV cache statistics (of a running server with --url, or after --prompt runs)")
    p.add_argument("--url", default=None, help="a running `zkv-mlx serve`, e.g. http://127.0.0.1:8080")
    p.add_argument("--api-key", default=None)
    p.add_argument("--prompt", action="append", help="chat prompt to run first (repeatable)")
    p.add_argument("--user", default=None)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--json", action="store_true")
    add_engine_flags(p)
    p.set_defaults(func=verb("commands.stats:run"))


def _add_server_verbs(sub) -> None:
    """serve, sessions."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (see docs/server.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-keys", default=None, metavar="FILE", help="JSON or TOML file mapping API key -> user")
    p.add_argument("--require-key", action="store_true", help="answer 401 to requests without a known API key")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests in flight before new ones get 429 (default 64)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="a browser front end (scheme://host[:port]) allowed to POST/DELETE, with CORS (repeatable)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a Host name accepted besides localhost/127.0.0.1/[::1] on a loopback bind (repeatable)")
    p.add_argument("--max-body", default="8MB", metavar="SIZE", help="request body limit (default 8MB)")
    p.add_argument("--max-upload", default="64GB", metavar="SIZE", help="session upload limit (default 64GB)")
    add_engine_flags(p)
    p.set_defaults(func=verb("server:serve"))

    p = sub.add_parser("sessions", help="saved sessions: list | info NAME | export NAME PATH | import PATH [NEW_NAME] "
                                         "| delete NAME")
    p.add_argument("action", choices=["list", "info", "export", "import", "delete"])
    # Two operands whose meaning depends on the action; commands.sessions.operands names them.
    p.add_argument("first", nargs="?", metavar="NAME", help="session name (import: the session file)")
    p.add_argument("second", nargs="?", metavar="PATH", help="export: destination file; import: a new name")
    p.add_argument("--user", default=None)
    p.add_argument("--json", action="store_true")
    add_engine_flags(p)
    p.set_defaults(func=verb("commands.sessions:run"))


def _add_tool_verbs(sub) -> None:
    """doctor, bench, eval."""
    p = sub.add_parser("doctor", help="check the installation: backend, BLAS speed, kernels, model, directories")
    p.add_argument("--json", action="store_true")
    p.add_argument("--kernels", action="store_true",
                   help="on a Mac: run every Metal kernel variant against the reference (pass/fail, GB/s)")
    p.add_argument("--model", "-m", metavar="M", default=None,
                   help="print the model's layer plan: per layer group its kind, window, KV heads, head dim and KV "
                        "bytes per token; parts zkv-mlx does not implement are named")
    p.set_defaults(func=verb("doctor:run_doctor"))

    p = sub.add_parser("bench", help="benchmarks that print JSON")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)

    def bench(name: str, help: str, rounds: int = 3, **options):
        # Every benchmark: JSON lines (the last is the result), A/B rounds, engine flags, its own options.
        b = bsub.add_parser(name, help=help)
        b.add_argument("--json", action="store_true", help="print only JSON lines (the last one is the result)")
        b.add_argument("--rounds", type=int, default=rounds)
        for flag, (default, text) in options.items():
            b.add_argument("--" + flag.replace("_", "-"), type=int, default=default, help=text)
        add_engine_flags(b)
        b.set_defaults(func=verb("bench:run_bench"))
        return b

    b = bench("decode", "decode speed: zkv vs mlx-lm generate_step on the same weights",
              context=(2048, "prompt tokens before decoding"), tokens=(64, "tokens decoded"))
    b.add_argument("--contexts", default=None, metavar="N,N,...",
                   help="several context lengths in one process, e.g. 2048,4096,8192 (instead of --context)")
    bench("batch", "continuous batching: tokens/s of one stream vs N concurrent streams",
          streams=(8, "concurrent streams"), tokens=(64, "tokens generated per stream"),
          prompt_tokens=(32, "prompt length of each stream"))
    bench("restore", "recompute a long conversation vs restore its session file", tokens=(4096, "conversation tokens"),
          restores=(3, "restores per round (each round recomputes once)"))
    bench("prefix", "time to first token: cold prompt vs one sharing a cached prefix",
          prefix_tokens=(2048, "shared prefix tokens"), suffix_tokens=(32, "distinct suffix tokens"))
    bench("longctx", "decode speed as a conversation grows past the KV budget: full cache vs --kv-policy",
          rounds=1, prompt_tokens=(256, "prompt tokens"), tokens=(1536, "tokens generated"),
          segment=(256, "tokens per measured segment"))
    bench("distributed", "one model on 2 local ranks (mx.distributed ring) vs one process: tok/s, bytes per step",
          context=(256, "prompt tokens before decoding"), tokens=(32, "tokens decoded"),
          ranks=(2, "ranks of the local job"))
    add_kv_quality_commands(sub, bsub)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line `zkv-mlx: error: ...` naming where the help is, exit 1
    (argparse's own prints the whole usage block and exits 2). Subcommand parsers inherit it."""

    def error(self, message: str):
        where = "" if self.prog == "zkv-mlx" else f"{self.prog}: "
        self.exit(1, f"zkv-mlx: error: {where}{message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        # Unknown flags are reported by the verb's own parser, so the message points at `zkv-mlx VERB --help`
        # (argparse reports them from the top-level parser, which names only `zkv-mlx`).
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            verb_parser = _verb_parser(self, ns)
            verb_parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return ns


def _verb_parser(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> argparse.ArgumentParser:
    """The deepest subparser `ns` was parsed with (e.g. `zkv-mlx bench decode`), else `parser` itself."""
    current = parser
    while True:
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(ns, subs[0].dest, None) if subs and subs[0].dest != argparse.SUPPRESS else None
        if not subs or chosen not in subs[0].choices:
            return current
        current = subs[0].choices[chosen]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zkv-mlx", description="Local LLM inference with a smart paged KV cache.")
    parser.add_argument("--version", action="version", version=f"zkv-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run_verbs(sub)
    _add_server_verbs(sub)
    _add_tool_verbs(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `zkv-mlx` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a bad flag: 1 after its one line (--help and --version still exit 0 as argparse does)
        if not e.code:
            raise
        return int(e.code)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import ZkvError

    try:
        return args.func(args)
    except ZkvError as e:
        print(f"zkv-mlx: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # never a traceback for users; ZKV_DEBUG=1 shows it
        if os.environ.get("ZKV_DEBUG"):
            raise
        print(f"zkv-mlx: error: {type(e).__name__}: {e} (set ZKV_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
