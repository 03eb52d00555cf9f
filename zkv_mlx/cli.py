"""`zkv-mlx` command line: generate, chat, doctor, bench. Errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Flags every engine-backed command accepts (also spelled as users know them from the zKV docs)."""
    g = p.add_argument_group("engine")
    g.add_argument("--model", "-m", default=None, help="GGUF file or mlx-lm model directory (default: bundled SmolLM2-135M-Instruct)")
    g.add_argument("--config", default=None, help="TOML config file (unknown keys are errors)")
    g.add_argument("--max-context", type=int, default=None, help="max tokens per sequence (default: the model's)")
    g.add_argument("--kv-cache-memory", "--kv-cache", dest="kv_cache_memory", default=None,
                   help='KV pool size: "4GB", "512MiB", bytes, or "dynamic" (default)')
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 16)")
    g.add_argument("--kv-dtype", default=None, choices=["auto", "float16", "bfloat16", "float32"])
    g.add_argument("--kv-quant", default=None, choices=["none", "int8", "int4", "k8v4"],
                   help="quantized KV cache: K and V bits (int4 keeps keys per channel; see docs/benchmarks.md)")
    g.add_argument("--kv-group-size", type=int, default=None, choices=[32, 64],
                   help="quantization group along head_dim (default 64)")
    g.add_argument("--weights-dtype", default=None, choices=["auto", "float32", "float16", "bfloat16", "quantized"],
                   help="auto: float32 on the CPU backend when memory allows, as stored on Metal")
    g.add_argument("--max-num-seqs", type=int, default=None, help="sequences decoded together at most")
    g.add_argument("--paged-attention", action="store_true", help="accepted for compatibility: paging is always on")
    g.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false", default=None,
                   help="turn automatic prefix caching off")
    g.add_argument("--prompt-cache-size", default=None, help='bytes of idle cached prefixes kept, e.g. "1GB"')
    g.add_argument("--prompt-cache-ttl", type=float, default=None, help="seconds an idle cached prefix is kept")
    g.add_argument("--ssd-cache", default=None, choices=["on", "off"], help="spill idle cached blocks to disk")
    g.add_argument("--ssd-dir", default=None, help="where SSD-tier block files go (default: the cache dir)")
    g.add_argument("--ssd-cache-size", default=None, help='SSD tier budget, e.g. "8GB" (default: 10%% of free disk)')
    add_policy_flags(g)


def add_policy_flags(g) -> None:
    g.add_argument("--kv-policy", default=None, choices=["full", "window", "h2o"],
                   help="long-context policy: keep every token (full), sinks + recent tokens (window, StreamingLLM) "
                        "or sinks + recent + heavy-hitter blocks (h2o)")
    g.add_argument("--budget", type=int, default=None, help="KV tokens a sequence keeps under window/h2o")
    g.add_argument("--sinks", type=int, default=None, help="leading tokens always kept under window/h2o (default 4)")
    g.add_argument("--h2o-recent", type=int, default=None, help="h2o: recent tokens always kept (default one block)")


def engine_kwargs(args) -> dict:
    return {
        "max_context": args.max_context,
        "kv_cache_memory": args.kv_cache_memory,
        "block_size": args.block_size,
        "kv_dtype": args.kv_dtype,
        "kv_quant": args.kv_quant,
        "kv_group_size": args.kv_group_size,
        "weights_dtype": args.weights_dtype,
        "max_num_seqs": args.max_num_seqs,
        "prompt_cache": args.prompt_cache,
        "prompt_cache_size": args.prompt_cache_size,
        "prompt_cache_ttl": args.prompt_cache_ttl,
        "ssd_cache": args.ssd_cache,
        "ssd_dir": args.ssd_dir,
        "ssd_cache_size": args.ssd_cache_size,
        "kv_policy": args.kv_policy,
        "budget": args.budget,
        "sinks": args.sinks,
        "h2o_recent": args.h2o_recent,
    }


def open_model(args):
    """Builds a ZKV from the parsed engine flags."""
    from .api import ZKV

    return ZKV(args.model, config=args.config, **engine_kwargs(args))


def add_sampling_flags(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_kwargs(args) -> dict:
    return {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "min_p": args.min_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed, "stop": args.stop,
    }


def cmd_generate(args) -> int:
    model = open_model(args)
    try:
        tok = model.tokenizer
        # Like mlx-lm's generate: a chat model gets its chat template unless --raw, or unless the prompt already
        # spells out special tokens (then it is taken as written).
        specials = [str(a.content) for a in tok.backend.get_added_tokens_decoder().values() if a.special]
        has_special = any(sp and sp in args.prompt for sp in specials)
        templated = tok.chat_template and not args.raw and not has_special
        run = model.chat if templated else model.generate
        for chunk in run(args.prompt, stream=True, user=args.user, **sampling_kwargs(args)):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        model.close()
    return 0


def cmd_chat(args) -> int:
    # The Textual app needs a terminal: piped or redirected I/O (and --plain) gets the line-based loop.
    if args.plain or not (sys.stdin.isatty() and sys.stdout.isatty()):
        from .chat_cli import run_chat

        return run_chat(args)
    from .app import run_tui

    return run_tui(lambda: open_model(args), what=args.model or "the bundled model (SmolLM2-135M-Instruct)",
                   user=args.user, session=getattr(args, "session", None), system=args.system,
                   sampling=sampling_kwargs(args))


def cmd_stats(args) -> int:
    import json

    if args.url:
        import urllib.error
        import urllib.request

        from .errors import ZkvError

        req = urllib.request.Request(args.url.rstrip("/") + "/v1/kv/stats")
        if args.api_key:
            req.add_header("Authorization", f"Bearer {args.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                stats = json.loads(r.read())
        except (urllib.error.URLError, ValueError) as e:
            raise ZkvError(f"cannot read stats from {args.url}: {e}; is `zkv-mlx serve` running there?") from None
    else:
        model = open_model(args)
        try:
            for p in args.prompt or []:
                model.chat(p, user=args.user, temperature=0, max_tokens=args.max_tokens)
            stats = model.kv_cache_stats()
        finally:
            model.close()
    if args.json:
        print(json.dumps(stats))
        return 0
    per_user = stats.pop("per_user", {})
    width = max(map(len, stats))
    for k, v in stats.items():
        print(f"{k:<{width}}  {round(v, 4) if isinstance(v, float) else v}")
    for u, v in per_user.items():
        print(f"user {u}: {v}")
    return 0


def cmd_serve(args) -> int:
    from .server import serve

    return serve(args)


def _export_file(src, dest: str) -> None:
    """Copies a session file to `dest` through `atomic_write`: only `dest` changes, and only when the copy is whole."""
    import shutil
    from pathlib import Path

    from .errors import SessionError
    from .storage.atomic import atomic_write

    d = Path(dest)
    if d.is_dir():
        raise SessionError(f"cannot export to {dest}: it is a directory; give a file path such as "
                           f"{d / Path(src).name}")
    try:
        with open(src, "rb") as fin, atomic_write(d) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    except OSError as e:
        raise SessionError(f"cannot export to {dest}: {e.strerror or e}; check that its directory exists and is "
                           "writable") from None


def cmd_sessions(args) -> int:
    import json

    from .errors import SessionError
    from .session import session_path, user_dir
    from .storage import session_file
    from .timestamps import iso_utc

    user = args.user or "local"
    if args.action == "list":
        d = user_dir(user)
        rows = []
        for f in sorted(d.glob("*" + session_file.SUFFIX)) if d.is_dir() else []:
            try:
                m = session_file.read_meta(f)
                rows.append({"name": f.name[: -len(session_file.SUFFIX)], "tokens": len(m["token_ids"]),
                             "messages": len(m["messages"]), "bytes": f.stat().st_size, "model": m.get("model_name"),
                             "updated_at": iso_utc(m.get("updated_at"))})
            except SessionError as e:
                rows.append({"name": f.name, "error": str(e)})
        if args.json:
            print(json.dumps(rows))
        elif not rows:
            print(f"no sessions for user {user!r} (in {d})")
        for r in rows if not args.json else []:
            print("  ".join(f"{k}={v}" for k, v in r.items()))
        return 0
    if args.action in ("info", "export", "delete"):
        if not args.name:
            raise SessionError(f"zkv-mlx sessions {args.action} needs a session NAME")
        p = session_path(user, args.name)
        if not p.exists():
            raise SessionError(f"no saved session named {args.name!r} for user {user!r}; see `zkv-mlx sessions list`")
        if args.action == "info":
            m = session_file.read_meta(p)
            info = {k: m.get(k) for k in ("name", "user", "model_name", "model_fingerprint", "kv_format",
                                           "block_size", "n_blocks", "created_at", "updated_at")}
            info.update(created_at=iso_utc(m.get("created_at")), updated_at=iso_utc(m.get("updated_at")))
            info.update(tokens=len(m["token_ids"]), messages=len(m["messages"]), bytes=p.stat().st_size, path=str(p))
            print(json.dumps(info, indent=None if args.json else 2))
        elif args.action == "delete":
            p.unlink()
            print(f"deleted session {args.name!r}")
        else:
            if not args.path:
                raise SessionError("zkv-mlx sessions export needs NAME and a destination PATH")
            session_file.read(p)  # never hand out a corrupt file
            _export_file(p, args.path)
            print(f"exported {args.name!r} to {args.path}")
        return 0
    if args.action == "import":
        if not args.name:
            raise SessionError("zkv-mlx sessions import needs the PATH of a session file")
        if args.path:
            from .names import check_name

            check_name(args.path, "new session name")  # before the model loads
        model = open_model(args)
        try:
            s = model.import_session(args.name, name=args.path, user=user)
            print(f"imported session {s.name!r} ({len(s.token_ids)} tokens) for user {user!r}")
        finally:
            model.close()
        return 0
    raise SessionError(f"unknown sessions action {args.action!r}")


def cmd_doctor(args) -> int:
    from .doctor import run_doctor

    return run_doctor(args)


def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


def cmd_kvmem(args) -> int:
    from .bench.kvmem import run

    return run(args)


def cmd_eval_ppl(args) -> int:
    from .eval.ppl import run

    return run(args)


def add_kv_quality_commands(sub, bsub) -> None:
    """`eval ppl` and `bench kvmem` (quantized KV cache)."""
    b = bsub.add_parser("kvmem", help="KV bytes per token (all layers, scales included) per format vs fp16")
    b.add_argument("--json", action="store_true", help="print only JSON lines (the last one is the result)")
    b.add_argument("--model", "-m", default=None)
    b.add_argument("--block-size", type=int, default=None)
    b.add_argument("--kv-group-size", type=int, default=None, choices=[32, 64])
    b.set_defaults(func=cmd_kvmem)
    p = sub.add_parser("eval", help="quality evaluations")
    esub = p.add_subparsers(dest="eval", metavar="EVAL", required=True)
    e = esub.add_parser("ppl", help="perplexity and KL of a quantized KV cache or a long-context policy vs the "
                                    "full-precision full cache")
    e.add_argument("--kv-quant", default=None, choices=["none", "int8", "int4", "k8v4"],
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
    e.set_defaults(func=cmd_eval_ppl)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zkv-mlx", description="Local LLM inference with a smart paged KV cache.")
    parser.add_argument("--version", action="version", version=f"zkv-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="answer (chat models) or continue (--raw) a prompt, streaming to stdout")
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--raw", action="store_true", help="continue the text as is, without the chat template")
    p.add_argument("--user", default=None)
    add_engine_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with the model in the terminal")
    p.add_argument("--user", default=None)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--session", default=None, help="open (or create) this named session")
    p.add_argument("--plain", action="store_true",
                   help="line-based chat instead of the terminal app (also used when stdin/stdout is not a TTY)")
    add_engine_flags(p)
    add_sampling_flags(p, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("stats", help="KV cache statistics (of a running server with --url, or after --prompt runs)")
    p.add_argument("--url", default=None, help="a running `zkv-mlx serve`, e.g. http://127.0.0.1:8080")
    p.add_argument("--api-key", default=None)
    p.add_argument("--prompt", action="append", help="chat prompt to run first (repeatable)")
    p.add_argument("--user", default=None)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--json", action="store_true")
    add_engine_flags(p)
    p.set_defaults(func=cmd_stats)

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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("sessions", help="saved sessions: list | info NAME | export NAME PATH | import PATH [NEW_NAME] "
                                         "| delete NAME")
    p.add_argument("action", choices=["list", "info", "export", "import", "delete"])
    p.add_argument("name", nargs="?", help="session name (import: the session file)")
    p.add_argument("path", nargs="?", help="export: destination file; import: a new name")
    p.add_argument("--user", default=None)
    p.add_argument("--json", action="store_true")
    add_engine_flags(p)
    p.set_defaults(func=cmd_sessions)

    p = sub.add_parser("doctor", help="check the installation: backend, BLAS speed, kernels, model, directories")
    p.add_argument("--json", action="store_true")
    p.add_argument("--kernels", action="store_true",
                   help="on a Mac: run every Metal kernel variant against the reference (pass/fail, GB/s)")
    p.set_defaults(func=cmd_doctor)

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
        b.set_defaults(func=cmd_bench)

    bench("decode", "decode speed: zkv vs mlx-lm generate_step on the same weights",
          context=(2048, "prompt tokens before decoding"), tokens=(64, "tokens decoded"))
    bench("batch", "continuous batching: tokens/s of one stream vs N concurrent streams",
          streams=(8, "concurrent streams"), tokens=(64, "tokens generated per stream"),
          prompt_tokens=(32, "prompt length of each stream"))
    bench("restore", "recompute a long conversation vs restore its session file", tokens=(4096, "conversation tokens"))
    bench("prefix", "time to first token: cold prompt vs one sharing a cached prefix",
          prefix_tokens=(2048, "shared prefix tokens"), suffix_tokens=(32, "distinct suffix tokens"))
    bench("longctx", "decode speed as a conversation grows past the KV budget: full cache vs --kv-policy",
          rounds=1, prompt_tokens=(256, "prompt tokens"), tokens=(1536, "tokens generated"),
          segment=(256, "tokens per measured segment"))
    add_kv_quality_commands(sub, bsub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `zkv-mlx` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
