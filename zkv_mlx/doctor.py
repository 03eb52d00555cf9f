"""`zkv-mlx doctor`: what this installation runs on and whether it is healthy."""

from __future__ import annotations

import json
import time

from . import _blas, paths


def gemm_gflops(n: int = 512, repeats: int = 5) -> float:
    """Measures fp32 matmul throughput (median of `repeats`) in GFLOP/s."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e9


def report() -> dict:
    """Collects the doctor's facts as a dict."""
    import mlx.core as mx

    from . import sysinfo
    from .kernels import kernel_path

    model = paths.default_model_path()
    return {
        "zkv_mlx": __import__("zkv_mlx").__version__,
        "mlx": mx.__version__,
        "backend": "Metal (GPU)" if sysinfo.backend() == "metal" else "CPU",
        "blas": ("OpenBLAS " + _blas.loaded_path) if _blas.loaded_path else f"MLX built-in ({_blas.reason})",
        "gemm_gflops": round(gemm_gflops(), 1),
        "kernels": kernel_path(),
        "kernels_note": "Metal kernels run on a Mac; on Linux the pure-MLX reference runs and tests/metal_sim checks the kernel sources",
        "default_model": str(model) if model else f"not installed ({paths.DEFAULT_MODEL_HINT})",
        "data_dir": str(paths.data_dir()),
        "cache_dir": str(paths.cache_dir()),
        "memory_gb": round(sysinfo.total_memory() / 1e9, 1),
    }


def run_doctor(args) -> int:
    if getattr(args, "kernels", False):
        from .kernel_check import run

        return run(args.json)
    if getattr(args, "model", None):
        return _layer_plan(args)
    r = report()
    if args.json:
        print(json.dumps(r))
    else:
        width = max(map(len, r))
        for k, v in r.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _layer_plan(args) -> int:
    """`doctor --model M`: loads M (weights as stored) and prints its layer plan."""
    from .model_info import layer_plan

    d = layer_plan(args.model)
    if args.json:
        print(json.dumps(d))
        return 0
    print(f"{d['model']} ({d['architecture']}): vocab {d['vocab_size']}, attention sinks: {d['sinks']}")
    for g in d["groups"]:
        if g["kind"] == "state":
            print(f"  state    x{g['slots']:<3} per-sequence recurrent state (not paged)")
            continue
        window = f" W={g['window']}" if g["window"] else ""
        dense = " dense" if g["dense"] else ""
        print(f"  {g['kind']:<8} x{g['slots']:<3}{window} {g['n_kv_heads']} KV heads, head dim {g['k_head_dim']}"
              f"/{g['v_head_dim']}{dense}: {g['kv_bytes_per_token']} KV bytes per token ({d['kv_dtype']})")
    for n in d["notes"]:
        print(f"  note: {n}")
    return 0
