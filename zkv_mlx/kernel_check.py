"""`zkv-mlx doctor --kernels`: on a Mac, run every paged-attention kernel variant against the pure-MLX reference
and report pass/fail and achieved bandwidth; elsewhere explain that the CPU simulator is the check."""

from __future__ import annotations

import itertools
import time

import mlx.core as mx

from . import sysinfo

CASES = list(itertools.product(
    ["float16", "bfloat16", "float32", "int8", "int4"],  # KV format
    [64, 128],  # head_dim
    [16, 32],  # block size
    [False, True],  # two-pass
))


def _case(fmt: str, head_dim: int, block_size: int, two_pass: bool, L: int = 2048, iters: int = 10):
    from .kernels.kv_format import quantize_pool
    from .kernels.metal import paged_attention_metal
    from .kernels.reference_quant import paged_attention_reference_quantized

    B, n_heads, n_kv = 4, 16, 4
    nb = L // block_size
    num_blocks = B * nb + 3
    dtype = mx.float32 if fmt in ("float32", "int8", "int4") else getattr(mx, fmt)
    q = mx.random.normal((B, n_heads, 1, head_dim)).astype(dtype)
    k = mx.random.normal((num_blocks, n_kv, block_size, head_dim)).astype(dtype)
    v = mx.random.normal((num_blocks, n_kv, block_size, head_dim)).astype(dtype)
    if fmt in ("int8", "int4"):
        k, v = quantize_pool(k, 8 if fmt == "int8" else 4, 32), quantize_pool(v, 8 if fmt == "int8" else 4, 32)
    perm = mx.random.permutation(num_blocks)[: B * nb].reshape(B, nb).astype(mx.int32)
    lens = mx.array([L, L - 1, L // 2 + 1, 1], dtype=mx.int32)
    scale = head_dim ** -0.5
    want = paged_attention_reference_quantized(q, k, v, perm, lens, scale, L)
    got = paged_attention_metal(q, k, v, perm, lens, scale, L, two_pass=two_pass)
    mx.eval(want, got)
    tol = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}.get(fmt, 2e-3)
    ok = bool(mx.allclose(got.astype(mx.float32), want.astype(mx.float32), atol=tol, rtol=tol).item())
    t0 = time.perf_counter()
    for _ in range(iters):
        mx.eval(paged_attention_metal(q, k, v, perm, lens, scale, L, two_pass=two_pass))
    dt = (time.perf_counter() - t0) / iters
    leaves = [x for x in (k if isinstance(k, tuple) else (k,))] + [x for x in (v if isinstance(v, tuple) else (v,))]
    per_token = sum(x.nbytes for x in leaves) / num_blocks / block_size
    gb_s = per_token * int(lens.sum().item()) / dt / 1e9
    return ok, gb_s


def run(json_out: bool) -> int:
    """Prints one line per variant (or JSON); returns the exit code (1 if any variant failed)."""
    import json

    if sysinfo.backend() != "metal":
        msg = ("no Metal GPU here: the kernels in metal/ are checked by the CPU simulator instead "
               "(pytest tests/metal_sim runs the exact .metal sources against the reference); "
               "run `zkv-mlx doctor --kernels` on a Mac to test them on the GPU")
        print(json.dumps({"kernels": "simulator", "note": msg}) if json_out else msg)
        return 0
    rows, failed = [], 0
    for fmt, d, bs, two in CASES:
        try:
            ok, gbs = _case(fmt, d, bs, two)
        except Exception as e:  # a compile failure on this Mac is exactly what this command is for
            ok, gbs = False, 0.0
            print(f"  {fmt} d={d} bs={bs} two_pass={two}: error {e}")
        failed += not ok
        rows.append({"kv": fmt, "head_dim": d, "block_size": bs, "two_pass": two, "pass": ok, "gb_s": round(gbs, 1)})
        if not json_out:
            print(f"{'PASS' if ok else 'FAIL'}  kv={fmt:<8} head_dim={d:<4} block={bs:<3} "
                  f"{'two-pass' if two else 'one-pass'}  {gbs:7.1f} GB/s")
    if json_out:
        print(json.dumps({"kernels": rows, "failed": failed}))
    return 1 if failed else 0
