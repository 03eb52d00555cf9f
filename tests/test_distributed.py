"""Issue 21: one model and its paged KV sharded over 2 local ranks (ring backend), checked against one process.

Each model's 2-rank job (tests/dist_job.py under `zkv_mlx.distributed.local.launch_local`, the environment
mlx.launch gives) runs at once with the others; the same checks run in this process without distribution first.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, write_tiny_model
from zkv_mlx import ZKV
from zkv_mlx.distributed.local import launch_local
from zkv_mlx.errors import DistributedError, ModelLoadError

sys.path.insert(0, str(Path(__file__).parent))
import dist_job  # noqa: E402

pytestmark = pytest.mark.distributed
JOB = str(Path(__file__).parent / "dist_job.py")
SESSION_FAMILIES = ["llama", "qwen3", "qwen3_moe"]
# sessions do not move yet: sliding-window layers (llama_swa: window 6; window tables chosen on rank 0, replayed on
# rank 1) and a hybrid (qwen3_5: gated-delta linear attention, each rank its state heads and its snapshots)
NO_SESSION_FAMILIES = {"llama_swa": "sliding-window", "qwen3_5": "hybrid model (state layers)",
                       "qwen3_5-pipeline": "--distributed pipeline", "qwen3_moe-pipeline": "--distributed pipeline"}
# mlx-lm's pipeline(): rank 1 holds the first half of the layers, rank 0 the rest (and their KV)
PIPELINE = {"qwen3_5-pipeline", "qwen3_moe-pipeline"}
FAMILIES = SESSION_FAMILIES + list(NO_SESSION_FAMILIES)
MOE = dict(model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
           decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=64, norm_topk_prob=True,
           rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=512, tie_word_embeddings=False)
# mlx-lm's qwen3_5 has shard() (qwen3_next has none): linear-attention heads and KV heads split over the ranks
QWEN3_5 = dict(model_type="qwen3_5", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
               max_position_embeddings=512, tie_word_embeddings=True, linear_num_value_heads=2,
               linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
               full_attention_interval=2, rope_parameters={"type": "default", "rope_theta": 10000.0,
                                                           "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]})
TIMEOUT = 240  # seconds a job may take before the test kills it (never a hang)
WATCHDOG = 5  # ZKV_DIST_TIMEOUT of the qwen3_moe job (its stop phase)


def _wait(procs, timeout=TIMEOUT):
    end = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, end - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank did not finish within {timeout} s")
    return codes


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, bundled_tokenizer):
    """family -> (model dir, single-process result dir, 2-rank result dir, open single-process ZKV)."""
    TINY.setdefault("qwen3_moe", MOE)
    TINY.setdefault("qwen3_5", QWEN3_5)
    TINY.setdefault("qwen3_5-pipeline", QWEN3_5)
    TINY.setdefault("qwen3_moe-pipeline", MOE)
    base = tmp_path_factory.mktemp("dist")
    out = {}
    for fam in FAMILIES:
        d = write_tiny_model(base / f"model-{fam}", fam, bundled_tokenizer)
        one, two = base / f"one-{fam}", base / f"two-{fam}"
        one.mkdir(), two.mkdir()
        out[fam] = [d, one, two]
    # the single-process reference (this process), keeping each model open for the 2 -> 1 import
    models = {}
    for fam, (d, one, _) in out.items():
        sys.argv = ["dist_job", str(d), str(one)]
        models[fam] = _reference(d, one)
    procs = {}
    for fam, (d, one, two) in out.items():
        env = {"ZKV_DATA_DIR": str(two / "data"), "ZKV_CACHE_DIR": str(two / "cache")}
        argv = [JOB, str(d), str(two), str(one / "session.zkvs"), "--distributed"]
        if fam == "llama":
            argv.append("--kill-phase")
        if fam in NO_SESSION_FAMILIES:
            argv.append("--no-sessions")
        if fam in PIPELINE:
            argv.append("--pipeline")
        if fam == "qwen3_moe-pipeline":
            argv.append("--abandon")
        if fam == "qwen3_moe":
            argv.append("--stop-phase")
            env["ZKV_DIST_TIMEOUT"] = str(WATCHDOG)
        procs[fam] = launch_local(2, argv, env, stderr=subprocess.PIPE)
    # once rank 0 has finished its checks: kill llama's rank 1, freeze qwen3_moe's (SIGSTOP: sockets stay open)
    end = time.monotonic() + TIMEOUT
    for fam, how, flag in (("llama", signal.SIGKILL, "killed"), ("qwen3_moe", signal.SIGSTOP, "stopped")):
        ready = out[fam][2] / "ready"
        while not ready.exists() and time.monotonic() < end and procs[fam][0].poll() is None:
            time.sleep(0.1)
        procs[fam][1].send_signal(how)
        (out[fam][2] / flag).write_text("1")
    codes = {fam: _wait(p) for fam, p in procs.items() if fam != "qwen3_moe"}
    codes["qwen3_moe"] = [_wait(procs["qwen3_moe"][:1])[0]]
    t_exit = time.time()
    procs["qwen3_moe"][1].kill()
    codes["qwen3_moe"].append(_wait(procs["qwen3_moe"][1:])[0])
    (out["qwen3_moe"][2] / "t_exit").write_text(str(t_exit))
    errs = {fam: [p.stderr.read().decode() for p in ps] for fam, ps in procs.items()}
    yield {fam: (*out[fam], models[fam], codes[fam], errs[fam]) for fam in FAMILIES}
    for m in models.values():
        m.close()


def _reference(d, one):
    m = ZKV(str(d), **dist_job.SETTINGS)
    greedy = dict(max_tokens=dist_job.MAX_TOKENS, temperature=0.0, ignore_eos=True)
    res = {"alone": [dist_job.tokens(m.submit(p, user="a", **greedy)) for p in dist_job.PROMPTS]}
    logits = {"cold": m.next_token_logits(dist_job.PROMPTS[2], user="c")}
    res["chat"] = m.chat(dist_job.CHAT, max_tokens=20, temperature=0.0)
    s = m.create_session("conv")
    s.chat(dist_job.CHAT, max_tokens=20, temperature=0.0)
    s.export(one / "session.zkvs")
    logits["own_session"] = m.next_token_logits(s.token_ids)
    res["session_tokens"] = s.token_ids
    np.savez(one / "logits.npz", **logits)
    (one / "result.json").write_text(json.dumps(res))
    return m


def _load(d: Path):
    return json.loads((d / "result.json").read_text()), dict(np.load(d / "logits.npz"))


@pytest.mark.parametrize("fam", FAMILIES)
def test_two_ranks_match_one_process(jobs, fam):
    d, one, two, model, codes, errs = jobs[fam]
    if fam == "qwen3_moe-pipeline":  # rank 0 ended without closing the job: rank 1 says so in one line
        assert codes == [0, 1], errs
        # (MLX's ring backend adds its own "[ring] Socket ... closed by the peer" lines, which zkv-mlx cannot stop)
        ours = [x for x in errs[1].splitlines() if "zkv-mlx" in x or "rank 1" in x]
        assert ours == ["zkv-mlx: rank 1: rank 0 ended (see its message); this rank exits too"], errs[1]
        assert "Traceback" not in errs[1]
    elif fam in ("qwen3", *NO_SESSION_FAMILIES):
        assert codes == [0, 0], errs
    r1, l1 = _load(one)
    r2, l2 = _load(two)
    assert r2["alone"] == r1["alone"]  # greedy tokens equal the single-process engine
    assert r2["batched"] == r2["alone"]  # 3 sequences in one decode batch equal each alone
    assert r2["prefix_hit"] == r2["alone"][0] and r2["hit_tokens"] >= 16  # a prefix hit equals a cold run
    np.testing.assert_allclose(l2["cold"], l1["cold"], atol=1e-4)
    assert r2["chat"] == r1["chat"]
    if fam in SESSION_FAMILIES:
        assert r2["session_tokens"] == r1["session_tokens"]
    # per-rank stats: each rank holds half of the KV heads and the same block count
    ranks = r2["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["blocks_total"] == ranks[1]["blocks_total"] > 0
    if fam in PIPELINE:  # every KV head of its own layers: one attention layer per rank (qwen3_5: 2 of its 4)
        assert ranks[0]["n_kv_heads"] == ranks[1]["n_kv_heads"] == TINY[fam]["num_key_value_heads"]
        assert ranks[0]["n_layers"] == ranks[1]["n_layers"] == 1
    else:  # tensor split: half of the KV heads of every layer
        assert ranks[0]["n_kv_heads"] == ranks[1]["n_kv_heads"] == TINY[fam]["num_key_value_heads"] // 2


@pytest.mark.parametrize("fam", list(NO_SESSION_FAMILIES))
def test_window_and_hybrid_sessions_are_refused_clearly_in_distributed_runs(jobs, fam):
    d, one, two, model, codes, errs = jobs[fam]
    r2, _ = _load(two)
    # refused up front: create_session and load_session (of a file made by one process) both, before any turn
    for key in ("session_error", "load_error"):
        assert r2[key].startswith("SessionError") and NO_SESSION_FAMILIES[fam] in r2[key], r2[key]
        assert "one machine" in r2[key] and "drop --session" in r2[key]
    assert not (two / "session.zkvs").exists() and (one / "session.zkvs").exists()


@pytest.mark.parametrize("fam", SESSION_FAMILIES)
def test_session_moves_between_world_sizes(jobs, fam):
    d, one, two, model, codes, errs = jobs[fam]
    r1, l1 = _load(one)
    r2, l2 = _load(two)
    # 1 -> 2: the 2-rank job imported the single-process file; its cached K/V give the same next-token logits
    assert r2["imported_hit_tokens"] >= 16
    np.testing.assert_allclose(l2["imported"], l1["own_session"], atol=1e-4)
    # 2 -> 1: the file the 2-rank job exported opens in one process with the same logits
    s = model.load_session(str(two / "session.zkvs"), name="from-two-ranks")
    before = model.kv_cache_stats()["hit_tokens"]
    logits = model.next_token_logits(s.token_ids)
    assert model.kv_cache_stats()["hit_tokens"] - before >= 16
    np.testing.assert_allclose(logits, l2["own_session"], atol=1e-4)


def test_killed_rank_gives_clear_error_in_bounded_time(jobs):
    d, one, two, model, codes, errs = jobs["llama"]
    kill = json.loads((two / "kill.json").read_text())
    assert kill["error"] is not None and kill["error"].startswith("DistributedError")
    assert "lost a rank" in kill["error"] and "mlx.launch" in kill["error"]
    assert kill["seconds"] < 10
    assert codes[0] == 1  # rank 0 ends non-zero
    # close() after the lost rank sends no collective (no SSD spill, no session save): no traceback, and the
    # session whose turn could not be saved is named in one line
    assert "Traceback" not in errs[0] and "Exception in thread" not in errs[0], errs[0]
    (lost,) = [x for x in errs[0].splitlines() if "could not save session 'kept'" in x]
    assert "lost a rank" in lost and "turns since the last save are lost" in lost


def test_frozen_rank_ends_rank_0_by_the_watchdog_and_idle_ranks_wait(jobs):
    d, one, two, model, codes, errs = jobs["qwen3_moe"]
    res = json.loads((two / "result.json").read_text())
    # idle past ZKV_DIST_TIMEOUT, then served: the other rank's wait for a plan has no watchdog
    assert res["after_idle"] == res["alone"][1]
    # rank 1 frozen (sockets open): rank 0's next collective is ended by the watchdog, exit 3, with a message
    assert codes[0] == 3, errs[0]
    assert f"no answer from the other ranks within {WATCHDOG} s" in errs[0] and "ZKV_DIST_TIMEOUT" in errs[0]
    waited = float((two / "t_exit").read_text()) - float((two / "t_stop").read_text())
    assert WATCHDOG - 1 < waited < WATCHDOG + 20


def test_mismatched_model_is_refused_at_start(tmp_path, bundled_tokenizer):
    # rank 1 gets other weights (another seed): both ranks refuse before any sharded forward
    a = write_tiny_model(tmp_path / "a", "llama", bundled_tokenizer, seed=0)
    b = write_tiny_model(tmp_path / "b", "llama", bundled_tokenizer, seed=1)
    script = tmp_path / "start.py"
    script.write_text(
        "import os, sys\nimport zkv_mlx\nfrom zkv_mlx import ZKV\n"
        "path = sys.argv[1] if os.environ['MLX_RANK'] == '0' else sys.argv[2]\n"
        "try:\n    ZKV(path, distributed=True, max_context=256, kv_cache_memory='4MB')\n"
        "except Exception as e:\n    print(f'{type(e).__name__}: {e}', file=sys.stderr); sys.exit(1)\n")
    procs = launch_local(2, [str(script), str(a), str(b)], {"ZKV_CACHE_DIR": str(tmp_path / "c")},
                         stderr=subprocess.PIPE)
    assert _wait(procs, 60) == [1, 1]
    err0 = procs[0].stderr.read().decode()
    assert "DistributedError: rank 1 differs from rank 0 in model fingerprint" in err0, err0
    assert "rank 1 differs" in procs[1].stderr.read().decode()


def test_model_without_shard_is_refused(tmp_path, bundled_tokenizer):
    from zkv_mlx.config import make_config
    from zkv_mlx.distributed.load import load_shard

    TINY.setdefault("starcoder2", dict(model_type="starcoder2", hidden_size=64, num_hidden_layers=2,
                                       intermediate_size=128, num_attention_heads=4, num_key_value_heads=2))
    d = write_tiny_model(tmp_path / "starcoder2", "starcoder2", bundled_tokenizer)

    class TwoRanks:  # load_shard refuses before any collective
        rank, size = 0, 2

    with pytest.raises(ModelLoadError, match="starcoder2.*has no shard") as e:
        load_shard(make_config(model=str(d)), TwoRanks())
    # it recommends only families that run distributed (deepseek_v3 has shard() but is refused: MLA)
    assert "tested: llama, qwen3, qwen3_moe" in str(e.value) and "deepseek" not in str(e.value)


def test_kv_policy_is_refused_with_the_distributed_reason(tiny_model_dir):
    from zkv_mlx.config import make_config
    from zkv_mlx.distributed.leader import LeaderRunner
    from zkv_mlx.distributed.load import load_shard
    from zkv_mlx.errors import ConfigError

    class TwoRanks:  # refused before loading anything or any collective, on every rank
        rank, size = 1, 2

    cfg = make_config(model=str(tiny_model_dir("llama")), distributed=True, kv_policy="window", budget=64)
    with pytest.raises(ConfigError, match="--kv-policy window.*not supported in distributed mode yet") as e:
        load_shard(cfg, TwoRanks())
    assert "rope module" not in str(e.value) and "docs/distributed.md" in str(e.value)
    # a request's own policy: the engine quotes the runner's blocker, which names distribution (not rope)
    blocker = LeaderRunner.policy_blocker(None)
    assert "not supported in distributed mode yet" in blocker and "rope" not in blocker


def test_distributed_outside_a_launched_job_is_a_clear_error(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("MLX_RANK", raising=False)
    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    with pytest.raises(DistributedError, match="mlx.launch"):
        ZKV(str(tiny_model_dir("llama")), distributed=True)


def test_plan_messages_round_trip():
    from zkv_mlx.distributed import plan as P
    from zkv_mlx.engine.sequence import SamplingParams, Sequence

    a = Sequence(prompt_ids=[4, 5, 6, 7, 8], params=SamplingParams())
    a.block_table, a.dropped = [3, 9], 0
    b = Sequence(prompt_ids=[1, 2], params=SamplingParams())
    b.block_table = [4]
    shadows: dict = {}
    r = P.Reader(P.encode_prefill([], a, 2, 5, False))
    assert r.int() == P.PREFILL
    P.apply_drops(r, shadows)
    s, start, end, all_logits = P.apply_prefill(r, shadows)
    assert (s.all_ids[2:5], start, end, s.block_table, all_logits) == ([6, 7, 8], 2, 5, [3, 9], False)
    r = P.Reader(P.encode_decode([a.seq_id], [b], [11]))
    assert r.int() == P.DECODE
    P.apply_drops(r, shadows)
    assert a.seq_id not in shadows and s.is_finished  # an ended sequence's state is dropped on every rank
    seqs, tokens = P.apply_decode(r, shadows)
    assert [(x.seq_id, x.num_tokens, x.block_table) for x in seqs] == [(b.seq_id, 2, [4])] and tokens == [11]


def _bench(*flags, timeout=TIMEOUT):
    cmd = [sys.executable, "-m", "zkv_mlx.cli", "bench", "distributed", "--json", "--rounds", "1", "--context", "24",
           "--tokens", "4", "--kv-cache-memory", "4MB", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_bench_distributed_counts_the_collectives_of_a_decode_step(tiny_model_dir):
    # tiny llama: 2 layers, hidden 64, float32 -> per decode step 2 all_sums per layer of [1, 1, 64] float32
    out = _bench("-m", str(tiny_model_dir("llama")))
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["model_collectives_per_step"] == 4 and res["model_bytes_per_step"] == 4 * 64 * 4
    assert res["plan_collectives_per_step"] == 1 and res["2_ranks_tok_s"] > 0 and res["one_process_tok_s"] > 0
    assert res["model_path"] == str(tiny_model_dir("llama")) and res["model_source"] == "-m"


def test_bench_distributed_pipeline_keeps_the_reference_in_one_process(tiny_model_dir):
    # --distributed pipeline reaches the ranks only: the one-process reference used to fail ("needs mlx.launch")
    TINY.setdefault("qwen3_moe", MOE)
    out = _bench("-m", str(tiny_model_dir("qwen3_moe")), "--distributed", "pipeline")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["split"] == "pipeline" and res["2_ranks_tok_s"] > 0 and res["one_process_tok_s"] > 0


def _one_error_line(out) -> str:
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("zkv-mlx: error:")]
    return line


def test_bench_distributed_refuses_a_model_that_does_not_split_before_launching(tiny_model_dir):
    from zkv_mlx import paths

    # the bundled model: 3 KV heads; the fix named (--ranks 3) is the one that works
    line = _one_error_line(_bench("-m", str(paths.default_model_path())))
    assert "3 KV heads do not split over 2 ranks" in line and "--ranks 3" in line, line
    line = _one_error_line(_bench("-m", str(tiny_model_dir("llama")), "--distributed", "pipeline"))
    assert "no pipeline()" in line and "mlx.launch" not in line, line


def test_bench_distributed_start_failure_is_one_line_with_a_runnable_hint(tiny_model_dir):
    # the ranks refuse a long-context policy at start; the bench says why in one line and how to rerun the job
    line = _one_error_line(_bench("-m", str(tiny_model_dir("llama")), "--kv-policy", "window", "--budget", "64"))
    assert "the 2-rank job ended early (rank 0: --kv-policy window" in line, line
    hand = line.split("run it by hand to see every rank's output: ")[1].split()
    assert "..." not in line and hand[1:5] == ["-n", "2", "--backend", "ring"]
    settings = json.loads(Path(hand[hand.index("zkv_mlx.bench.distributed_job") + 1]).read_text())
    assert settings["engine"]["kv_policy"] == "window" and hand[-2:] == ["--rounds", "1"]


def test_bench_distributed_default_model_is_a_generated_llama_whose_kv_heads_split(tmp_path, monkeypatch):
    from zkv_mlx.bench.distributed import bench_model

    monkeypatch.setenv("ZKV_CACHE_DIR", str(tmp_path))
    d = bench_model()
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == \
        ("llama", 8, 512, 4)
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert bench_model() == d and (d / "model.safetensors").stat().st_mtime_ns == stamp  # written once
    assert [p.name for p in d.parent.iterdir()] == [d.name]  # no temporary directory left behind


def test_distributed_md_python_example(tmp_path, tiny_model_dir):
    # docs/distributed.md's example, as written, on 2 local ranks in a directory where ./my-model is a tiny llama
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text()
    (code,) = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    (tmp_path / "my-model").symlink_to(tiny_model_dir("llama"))
    (tmp_path / "app.py").write_text(code)
    env = {"ZKV_DATA_DIR": str(tmp_path / "data"), "ZKV_CACHE_DIR": str(tmp_path / "cache")}
    procs = launch_local(2, ["app.py"], env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert _wait(procs) == [0, 0], [p.stderr.read().decode()[-2000:] for p in procs]
    assert procs[0].stdout.read().decode().strip()  # rank 0 printed the reply
    assert procs[1].stdout.read().decode() == ""  # rank 1 never returned from ZKV(...)


def test_ssd_tier_per_rank_promotes_on_every_rank_and_recomputes_a_corrupt_rank(tmp_path, tiny_model_dir):
    import dist_ssd_job as job

    d = tiny_model_dir("llama")
    with ZKV(str(d), ssd_cache="off", prompt_cache=False, kv_cache_memory="4MB", **job.SETTINGS) as m:
        cold = dist_job.tokens(m.submit(job.PROMPT, **job.GREEDY))
    procs = launch_local(2, [str(Path(__file__).parent / "dist_ssd_job.py"), str(d), str(tmp_path)],
                         stderr=subprocess.PIPE)
    assert _wait(procs, 120) == [0, 0], [p.stderr.read().decode()[-2000:] for p in procs]
    res = json.loads((tmp_path / "result.json").read_text())
    # each rank's files are under its own cache dir
    assert list((tmp_path / "cache-rank0").rglob("*.kvb")) and res["corrupted_files"] > 0
    assert res["cold"] == cold
    # evicted to SSD, promoted on both ranks: the greedy tokens equal a cold single-process run
    assert res["promoted"] == cold
    assert res["after_promote"]["hit_tokens"] - res["before_promote"]["hit_tokens"] >= 48
    for before, after in zip(res["before_promote"]["ranks"], res["after_promote"]["ranks"]):
        assert before["ssd_spills"] > 0 and after["ssd_promotions"] - before["ssd_promotions"] >= 3
        assert before["ssd_blocks"] > 0
    # rank 1's files corrupted: no rank promotes, rank 0 recomputes, the tokens stay right
    assert res["recomputed"] == cold
    assert res["after_corrupt"]["hit_tokens"] == res["before_corrupt"]["hit_tokens"]
    assert [r["ssd_promotions"] for r in res["after_corrupt"]["ranks"]] == \
        [r["ssd_promotions"] for r in res["before_corrupt"]["ranks"]]


def test_distributed_flag_chooses_the_split():
    from zkv_mlx.cli import build_parser
    from zkv_mlx.cli_common import engine_kwargs
    from zkv_mlx.config import make_config
    from zkv_mlx.errors import ConfigError

    parser = build_parser()

    def cfg(*flags):
        return make_config(model="m", **engine_kwargs(parser.parse_args(["generate", "--prompt", "hi", *flags])))

    assert (cfg().distributed, cfg().distributed_split) == (False, "tensor")
    assert (cfg("--distributed").distributed, cfg("--distributed").distributed_split) == (True, "tensor")
    c = cfg("--distributed", "pipeline", "-m", "x")
    assert (c.distributed, c.distributed_split) == (True, "pipeline")
    with pytest.raises(ConfigError, match="'layers' is not one of tensor, pipeline"):
        make_config(model="m", distributed=True, distributed_split="layers")


def test_pipeline_split_needs_a_model_with_pipeline(tiny_model_dir):
    from zkv_mlx.config import make_config
    from zkv_mlx.distributed.load import load_shard

    class TwoRanks:  # load_shard refuses before any collective
        rank, size = 0, 2

    cfg = make_config(model=str(tiny_model_dir("llama")), distributed=True, distributed_split="pipeline")
    with pytest.raises(ModelLoadError, match="llama.*has no pipeline.*--distributed tensor"):
        load_shard(cfg, TwoRanks())


def test_chat_session_that_cannot_be_saved_is_refused_at_start(tmp_path, tiny_model_dir):
    # sliding-window layers: a distributed run cannot save its sessions, so `chat --session` refuses before the
    # first turn (it used to run and say only at /quit that nothing was saved); rank 0 then closes the job cleanly
    from zkv_mlx.chat_cli import banner

    env = {"ZKV_DATA_DIR": str(tmp_path / "data"), "ZKV_CACHE_DIR": str(tmp_path / "cache")}
    argv = ["-m", "zkv_mlx.cli", "chat", "--plain", "--distributed", "-m", str(tiny_model_dir("llama_swa")),
            "--kv-cache-memory", "4MB", "--max-tokens", "2", "--session", "trip"]
    procs = launch_local(2, argv, env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs[0].stdin.write(b"hello\n/quit\n")
    procs[0].stdin.close()
    assert _wait(procs, 120) == [1, 0]
    err0 = procs[0].stderr.read().decode()
    (line,) = [x for x in err0.splitlines() if x.startswith("zkv-mlx: error:")]
    assert "--session trip: sessions of a model with sliding-window layers cannot be saved" in line, err0
    assert "drop --session" in line and "one machine" in line and "Traceback" not in err0
    err1 = procs[1].stderr.read().decode()  # rank 1 got CLOSE: it ends 0 without an error line
    assert b"assistant>" not in procs[0].stdout.read() and "zkv-mlx: " not in err1 and "Traceback" not in err1
    # under --distributed Ctrl-D does not end the loop (mlx.launch keeps stdin open): the banner says /quit only
    assert banner(True).endswith("/stats, /quit.") and "Ctrl-D" in banner(False)


def test_a_lost_peer_met_inside_the_models_own_evaluation_is_a_distributed_error():
    # kill -9 of a rank while rank 0 builds a prefill: the ring backend's RuntimeError surfaces from an async_eval
    # inside the model's code (before LeaderRunner._eval); it must end the job as DistributedError, not a traceback
    from zkv_mlx.distributed.group import DistGroup
    from zkv_mlx.distributed.leader import LeaderRunner
    from zkv_mlx.errors import DistributedError

    group = object.__new__(DistGroup)
    group.rank, group.failed, group.failed_during = 0, None, None
    leader = object.__new__(LeaderRunner)
    leader.group = group
    with pytest.raises(DistributedError, match="lost a rank during a forward pass"):
        with leader._collectives("a forward pass"):
            raise RuntimeError("[ring] connection to a peer was lost")
    assert isinstance(group.failed, DistributedError)  # later calls fail at once with the same error
    with pytest.raises(RuntimeError, match="unrelated"):  # other errors are not disguised as a lost rank
        with leader._collectives("a forward pass"):
            raise RuntimeError("unrelated")
