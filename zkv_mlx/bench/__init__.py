"""`zkv-mlx bench ...`: benchmarks printing JSON, comparing side by side in one run (A/B alternating, medians)."""


# The counts each benchmark takes (its own int options and --rounds): a 0 would load the models and then fail.
COUNTS = ("rounds", "context", "tokens", "streams", "prompt_tokens", "prefix_tokens", "suffix_tokens", "segment")


def run_bench(args) -> int:
    from ..errors import ConfigError

    for name in COUNTS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {value}: must be >= 1 (see zkv-mlx bench {args.bench} --help for the default)")
    if args.bench == "decode":
        from .decode import run

        return run(args)
    if args.bench == "prefix":
        from .prefix import run

        return run(args)
    if args.bench == "batch":
        from .batch import run

        return run(args)
    if args.bench == "restore":
        from .restore import run

        return run(args)
    if args.bench == "distributed":
        from .distributed import run

        return run(args)
    if args.bench == "longctx":
        from .longctx import run

        return run(args)
    raise SystemExit(f"unknown benchmark {args.bench!r}")
