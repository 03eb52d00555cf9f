"""`zkv-mlx bench ...`: benchmarks printing JSON, comparing side by side in one run (A/B alternating, medians)."""


def run_bench(args) -> int:
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
    if args.bench == "longctx":
        from .longctx import run

        return run(args)
    raise SystemExit(f"unknown benchmark {args.bench!r}")
