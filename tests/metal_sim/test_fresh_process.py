"""Issue 17 §6: MLX arrays must not cross threads. In a fresh process the engine thread makes the first Metal
kernel call; every pool format must run its kernels there with no fallback and give the reference's tokens.

MLX streams are per thread: a lazy array built on the importing thread (a module-level constant) cannot be
evaluated on the engine thread ("There is no Stream(cpu, 0) in current thread"). The simulator evaluates its
inputs on the calling thread, as MLX does, so it fails the same way (see runner.SimKernel.__call__).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zkv_mlx.config import KEY_LAYOUTS, KV_DTYPES, KV_QUANTS

CHILD = Path(__file__).with_name("fresh_decode.py")
N_TOKENS = 6

# Every KV pool format the engine offers, derived from the config's choices: each float dtype unquantized,
# and each quantized format with keys per token and per channel.
FORMATS = [{"kv_dtype": d} for d in KV_DTYPES if d != "auto"] + [
    {"kv_quant": q, "kv_key_layout": layout} for q in KV_QUANTS if q != "none" for layout in KEY_LAYOUTS
    if layout != "auto"]


@pytest.fixture(scope="module")
def tiny_d64_dir(bundled_tokenizer, tmp_path_factory):
    """A tiny random qwen3 with head_dim 64 (the kernels' smallest), as an mlx-lm directory."""
    from conftest import TINY, write_tiny_model

    TINY.setdefault("qwen3-d64", dict(TINY["qwen3"], head_dim=64))
    return str(write_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-d64"), "qwen3-d64", bundled_tokenizer))


PROMPT = [int(t) for t in np.random.default_rng(7).integers(10, 4000, 37)]


def run_child(model_dir: str, fmts: list[dict], kernels: str, tmp_path) -> dict:
    env = dict(os.environ, ZKV_KERNELS=kernels, ZKV_DATA_DIR=str(tmp_path / "data"),
               ZKV_CACHE_DIR=str(tmp_path / "cache"), PYTHONWARNINGS="error")
    res = subprocess.run([sys.executable, str(CHILD), model_dir, json.dumps(fmts), json.dumps(PROMPT),
                          str(N_TOKENS)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, f"{fmts} with ZKV_KERNELS={kernels} failed:\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr and "Warning" not in res.stderr, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference_tokens(tiny_d64_dir, tmp_path_factory):
    """Greedy tokens of every format on the reference path (one process: nothing here needs to be fresh)."""
    got = run_child(tiny_d64_dir, FORMATS, "reference", tmp_path_factory.mktemp("ref"))
    assert got["launches"] == 0 and all(len(t) == N_TOKENS for t in got["tokens"])
    return dict(zip(map(json.dumps, FORMATS), got["tokens"]))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "-".join(str(v) for v in f.values()))
def test_first_metal_decode_on_the_engine_thread_in_a_fresh_process(fmt, tiny_d64_dir, reference_tokens, tmp_path):
    got = run_child(tiny_d64_dir, [fmt], "metal", tmp_path)  # a KernelError fails the child
    assert got["tokens"] == [reference_tokens[json.dumps(fmt)]]
    assert got["launches"] >= (N_TOKENS - 1) * 2  # every decode step of both layers ran a kernel


def test_auto_mode_does_not_fall_back_in_a_fresh_process(tiny_d64_dir, reference_tokens, tmp_path):
    """auto with Metal available: a failing kernel would warn and fall back; warnings are errors here."""
    fmt = {"kv_dtype": "float16"}
    got = run_child(tiny_d64_dir, [fmt], "auto", tmp_path)
    assert got["tokens"] == [reference_tokens[json.dumps(fmt)]]
    assert got["launches"] >= (N_TOKENS - 1) * 2


def test_the_simulator_rejects_a_lazy_input_from_another_thread():
    """As MLX on a Mac: inputs are evaluated on the calling thread, so another thread's lazy array fails there."""
    import threading

    import mlx.core as mx

    from . import fake_metal_kernel

    lazy = mx.arange(64).astype(mx.float32) * 2  # built on this thread, not evaluated
    kernel = fake_metal_kernel(name="copy", input_names=["a"], output_names=["out"],
                               source="uint i = thread_position_in_grid.x; out[i] = a[i];")
    call = dict(output_shapes=[(64,)], output_dtypes=[mx.float32], grid=(64, 1, 1), threadgroup=(64, 1, 1))
    errors = []

    def worker():
        try:
            kernel(inputs=[lazy], **call)
        except RuntimeError as e:
            errors.append(str(e))
        finally:
            mx.clear_streams()  # MLX threads release their streams before they end (ml-explore/mlx#4327)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert errors and "no Stream" in errors[0]
    np.testing.assert_array_equal(np.array(kernel(inputs=[lazy], **call)[0]), np.arange(64) * 2)  # same thread: fine
