"""The issue-20 benchmark modes run end to end on a tiny model and report what they promise (not their speed)."""

import json

from zkv_mlx.cli import main


def test_bench_decode_contexts_reports_each_context(tiny_model_dir, capsys):
    argv = ["bench", "decode", "--contexts", "40,72", "--tokens", "4", "--rounds", "2", "--json",
            "--model", str(tiny_model_dir("llama"))]
    assert main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    rounds, result = [x for x in lines if "round" in x], lines[-1]
    # rounds alternate per context: two decode rounds each, in context order; each context's row when it is done
    assert [(r["context"], r["round"]) for r in rounds] == [(40, 0), (40, 1), (72, 0), (72, 1)]
    done = [x for x in lines[:-1] if "ratio" in x]
    assert done == result["contexts"] and lines.index(done[0]) == 2
    assert [row["context"] for row in result["contexts"]] == [40, 72]
    for row in result["contexts"]:
        assert row["zkv_tok_s"] > 0 and row["mlx_lm_tok_s"] > 0 and row["prefill_zkv_tok_s"] > 0
        assert abs(row["ratio"] - row["zkv_tok_s"] / row["mlx_lm_tok_s"]) < 0.01
    assert result["rounds"] == 2 and result["prefill_rounds"] == 1 and "machine" in result


def test_bench_decode_bad_contexts_fail_in_one_line_before_loading(capsys):
    for bad, item in (("2048,x", "'x'"), ("0", "'0'"), ("4096,,8192", "''")):
        assert main(["bench", "decode", "--contexts", bad, "--model", "/nonexistent"]) == 1
        err = capsys.readouterr().err
        assert item in err and "--contexts 2048,4096,8192" in err
        assert "nonexistent" not in err and "Traceback" not in err


def test_bench_batch_reports_the_models_own_ceiling(tiny_model_dir, capsys):
    argv = ["bench", "batch", "--streams", "3", "--tokens", "6", "--prompt-tokens", "8", "--rounds", "1", "--json",
            "--model", str(tiny_model_dir("llama"))]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model_step_ms_1"] > 0 and result["model_step_ms_n"] > 0
    want = 3 * result["model_step_ms_1"] / result["model_step_ms_n"]
    assert abs(result["model_speedup_ceiling"] - want) < 0.05 * want + 0.01
    assert result["speedup"] > 0 and result["streams"] == 3
    assert len(result["speedup_per_round"]) == 1 and result["paired_speedup"] == result["speedup_per_round"][0]
    frac = result["speedup_per_round"][0] / result["model_ceiling_per_round"][0]
    assert abs(result["fraction_of_ceiling"] - frac) < 0.02 * frac + 0.002


def test_bench_batch_sizes_the_pool_for_its_streams(tiny_model_dir, capsys):
    # The "dynamic" default holds four contexts: 8 streams would preempt each other. Without --kv-cache-memory the
    # bench reopens the engine with a pool for every stream and none is preempted; an explicit size is kept.
    from zkv_mlx.bench.batch import _blocks_needed

    base = ["bench", "batch", "--streams", "8", "--tokens", "20", "--prompt-tokens", "24", "--rounds", "1", "--json",
            "--model", str(tiny_model_dir("llama"))]
    assert main(base) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["kv_blocks"] >= _blocks_needed(8, 24 + 20 + 16, 16)
    assert result["preemptions"] == 0
    assert main(base + ["--kv-cache-memory", "dynamic"]) == 0
    small = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert small["kv_blocks"] < _blocks_needed(8, 24 + 20 + 16, 16) and small["preemptions"] > 0


def test_roofline_decode_bytes_add_weights_and_kv():
    from zkv_mlx.kernels import roofline_decode as rd

    model = "SmolLM2-135M (bundled), fp16 weights"
    w, kv = rd.bytes_per_token(model, "fp16/bf16", 4096)
    assert w == 134.5e6 * 2 and kv == 30 * 3 * 4096 * 2 * 64 * 2  # layers * heads * L * (K + V) * D * 2 bytes
    # k8v4 sits between int8 and int4, each a fraction of fp16
    sizes = [rd.bytes_per_token(model, f, 4096)[1] for f in ("fp16/bf16", "int8", "k8v4", "int4")]
    assert sizes == sorted(sizes, reverse=True)


def test_bench_restore_splits_load_and_first_token(tiny_model_dir, capsys):
    argv = ["bench", "restore", "--tokens", "70", "--rounds", "1", "--json", "--model", str(tiny_model_dir("llama"))]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["read_gb_s"] > 0 and r["file_bytes"] > 0 and r["memory_hit_s"] > 0
    assert abs(r["restore_s"] - (r["load_s"] + r["first_token_s"])) < 0.01 + 0.001 * r["restore_s"]
    assert r["restores"] == 3  # the default: three restores per recompute


def test_bench_restore_rows_are_rounds_times_restores(tiny_model_dir, capsys):
    argv = ["bench", "restore", "--tokens", "40", "--rounds", "2", "--restores", "2", "--json",
            "--model", str(tiny_model_dir("llama"))]
    assert main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    rows, r = lines[:-1], lines[-1]
    assert [row["round"] for row in rows] == [0, 0, 1, 1] and r["rounds"] == 2 and r["restores"] == 2
    for row in rows:
        assert abs(row["restore_s"] - (row["load_s"] + row["first_token_s"])) < 0.002
        assert row["read_s"] > 0 and row["memory_hit_s"] > 0


def test_bench_restore_refuses_zero_restores_in_one_line(capsys):
    assert main(["bench", "restore", "--restores", "0", "--model", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert "--restores" in err and "got 4096, 3, 0" in err and "Traceback" not in err
