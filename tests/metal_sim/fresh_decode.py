"""Child process of test_fresh_process.py (not a test module): a fresh interpreter imports zkv_mlx, puts the
simulator in place of `mx.fast.metal_kernel` and generates greedily through `ZKV`, so the first kernel call
happens on the engine thread, as in `zkv-mlx chat` on a Mac.

    python fresh_decode.py MODEL_DIR '[{"kv_quant": "int8"}, ...]' '[1, 2, 3]' N_TOKENS

Runs one ZKV per format in turn and prints one JSON line {"tokens": [[...] per format], "launches": N}. Warnings are errors, so a fallback to the reference
(auto mode) fails the run; with ZKV_KERNELS=metal a failing kernel raises KernelError instead.
"""

import json
import os
import sys
import warnings

warnings.simplefilter("error")

import zkv_mlx  # noqa: E402  (what a user's program does first: every module-level statement runs here)
from zkv_mlx import ZKV  # noqa: E402

import mlx.core as mx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from metal_sim import fake_metal_kernel, stats  # noqa: E402


def main() -> None:
    model_dir, fmts, prompt, n = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    mx.fast.metal_kernel = fake_metal_kernel
    if os.environ.get("ZKV_KERNELS") == "auto":  # make auto choose Metal here, as it would on a Mac
        from zkv_mlx.kernels import dispatch

        dispatch.metal_available = lambda: True
    print(json.dumps({"tokens": [generate(model_dir, fmt, prompt, n) for fmt in fmts], "launches": stats["launches"]}))


def generate(model_dir: str, fmt: dict, prompt: list[int], n: int) -> list[int]:
    tokens = []
    with ZKV(model_dir, kv_cache_memory="16MB", prompt_cache_enabled=False, ssd_cache=False, **fmt) as model:
        for ev in model.submit(prompt, temperature=0, max_tokens=n, ignore_eos=True):
            if ev.kind == "error":
                raise ev.error
            if ev.token_id is not None:
                tokens.append(ev.token_id)
    return tokens


if __name__ == "__main__":
    main()
