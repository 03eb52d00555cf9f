"""Long-context policies (window = StreamingLLM, h2o = heavy hitters): exact kept blocks, positions, engine use."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import TINY, write_tiny_model
from zkv_mlx.cache.policy import KVPolicy, rotation_shifts
from zkv_mlx.config import PolicyConfig, make_config
from zkv_mlx.errors import ConfigError


def test_window_drops_oldest_non_sink_blocks():
    p = KVPolicy("window", budget=64, block_size=8, sinks=4)
    assert p.sink_blocks == 1 and p.recent_blocks == 0
    assert p.drops(56, 8) == []  # exactly at the budget
    assert p.drops(64, 1) == [1]  # one token over: the oldest block after the sinks
    assert p.drops(60, 8) == [1]  # table [0..7], the tail (index 7) half full
    assert p.drops(64, 16) == [1, 2]
    assert KVPolicy("window", 64, 8, sinks=0).drops(64, 1) == [0]  # truncation: no sinks
    assert KVPolicy("window", 64, 8, sinks=9).drops(64, 1) == [2]  # 9 sink tokens = 2 blocks


def test_h2o_keeps_sinks_recent_and_heavy_blocks():
    p = KVPolicy("h2o", budget=96, block_size=8, sinks=4, recent=32)
    assert p.sink_blocks == 1 and p.recent_blocks == 4
    # 12 full blocks: index 0 sink, 8..11 recent; candidates 1..7 ranked by score (ties: older first)
    scores = [0.0, 0.5, 0.1, 0.9, 0.1, 0.3, 0.8, 0.2, 0, 0, 0, 0]
    assert p.drops(96, 1, scores) == [2]
    assert p.drops(96, 17, scores) == [2, 4, 7]
    assert p.drops(96, 40, scores) == [1, 2, 4, 5, 7]
    with pytest.raises(ValueError):
        p.drops(96, 1, None)


def test_rotation_shifts_move_kept_blocks_by_the_tokens_dropped_after_them():
    assert rotation_shifts(6, [1], 8) == [8, 0, 0, 0, 0]
    assert rotation_shifts(7, [1, 3], 8) == [16, 8, 0, 0, 0]
    assert rotation_shifts(4, [], 8) == [0, 0, 0, 0]


def test_budget_and_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="--budget 32"):
        KVPolicy.from_config(PolicyConfig(kind="window", budget=16), 8)
    with pytest.raises(ConfigError, match="needs a budget"):
        make_config(kv_policy="window")
    with pytest.raises(ConfigError, match="not one of"):
        make_config(kv_policy="lru", budget=512)
    cfg = make_config(kv_policy="h2o", budget=512, sinks=8)
    assert (cfg.policy.kind, cfg.policy.budget, cfg.policy.sinks) == ("h2o", 512, 8)
    assert KVPolicy.from_config(make_config().policy, 16) is None


@pytest.fixture(scope="module")
def lm1(tiny_model_dir, bundled_tokenizer, tmp_path_factory):
    """A one-layer tiny llama: its K/V depend only on token and position, so policies can be checked exactly."""
    from zkv_mlx.models.loader import load_model

    TINY.setdefault("llama1", dict(TINY["llama"], num_hidden_layers=1))
    path = write_tiny_model(tmp_path_factory.mktemp("tiny-llama1"), "llama1", bundled_tokenizer)
    return load_model(str(path), "float32")


def _run(lm, policy, ids, chunk):
    from zkv_mlx.eval.ppl import _PolicyRun

    r = _PolicyRun(lm, policy, 64)
    r.start(ids)
    logits = None
    for s in range(0, len(ids), chunk):
        logits = r.chunk(s, min(len(ids), s + chunk))
    return r, logits


def test_window_keeps_exact_block_ids(lm1):
    pol = KVPolicy("window", budget=48, block_size=8, sinks=4)
    ids = list(range(100, 180))  # 80 tokens in chunks of 8
    r, _ = _run(lm1, pol, ids, 8)
    # blocks are taken in order 0, 1, 2, ... and each chunk past 48 tokens drops the oldest non-sink block
    assert r.seq.block_table == [0, 5, 6, 7, 8, 9]
    assert r.seq.dropped == 32 and r.seq.cache_len == 48
    assert r.free[-4:] == [1, 2, 3, 4]


def test_h2o_drops_the_lightest_candidate_block_by_id(lm1):
    pol = KVPolicy("h2o", budget=48, block_size=8, sinks=4, recent=16)
    r, _ = _run(lm1, pol, list(range(300, 348)), 8)  # 48 tokens: blocks 0..5, at the budget
    assert r.seq.block_table == [0, 1, 2, 3, 4, 5] and r.seq.dropped == 0
    # candidates are table indices 1..3 (0 holds the sinks, 4..5 are recent); make index 3 the lightest
    r.seq.mass[:] = [0.0, 5.0, 4.0, 1.0, 0.0, 0.0]
    r.seq.seen[:] = [0, 8, 8, 8, 0, 0]
    r.seq.prompt_ids = list(range(300, 356))
    r.chunk(48, 56)
    assert r.seq.block_table == [0, 1, 2, 4, 5, 6] and r.seq.dropped == 8
    assert r.held_positions == list(range(24)) + list(range(32, 56))


@pytest.mark.parametrize("kind", ["window", "h2o"])
def test_kept_keys_are_positioned_within_the_cache(lm1, kind):
    """After drops, the last logits equal a full forward over just the kept tokens at positions 0..n-1
    (StreamingLLM positions); one layer, so kept K/V do not depend on the dropped context."""
    from zkv_mlx.engine.runner import ModelRunner
    from zkv_mlx.engine.sequence import SamplingParams, Sequence

    pol = KVPolicy(kind, budget=48, block_size=8, sinks=4, recent=16)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 2000, size=77).tolist()
    r, logits = _run(lm1, pol, ids, 8)
    assert r.seq.dropped > 0
    held = r.held_positions
    assert len(held) == r.seq.cache_len <= 48
    assert held[:8] == list(range(8))  # the sink block
    assert held[-5:] == list(range(72, 77))  # the tail
    ref = ModelRunner(lm1, 16, 8, mx.float32)
    s = Sequence(prompt_ids=[ids[p] for p in held], params=SamplingParams(max_tokens=1))
    s.block_table = list(range(16))
    full = ref.prefill(s, 0, len(held), all_logits=True)
    np.testing.assert_allclose(np.array(logits[-1]), np.array(full[-1]), rtol=1e-4, atol=1e-4)


def test_h2o_score_is_decayed_attention_mass_per_query(lm1):
    from zkv_mlx.engine import drop

    pol = KVPolicy("h2o", budget=48, block_size=8, sinks=4, recent=16, half_life=8.0)
    r, _ = _run(lm1, pol, list(range(200, 240)), 8)  # 40 tokens: below the budget, nothing dropped
    heads = lm1.model.model.layers[0].self_attn.n_heads
    assert r.seq.dropped == 0
    # the last chunk's mass: every one of its 8 queries spreads one unit per head over the blocks
    assert float(r.runner.mass[0].sum()) == pytest.approx(8 * heads, rel=1e-4)
    assert r.seq.seen == [40, 32, 24, 16, 8]  # queries that have seen each block
    # by hand: a half-life of 8 tokens halves the old score per 8-query chunk
    seq = r.seq
    seq.mass[:], seq.seen[:] = [], []
    drop.add_mass(seq, mx.array([4.0, 8.0]), 8)
    assert seq.mass == [0.5, 1.0] and seq.seen == [8, 8]
    drop.add_mass(seq, mx.array([0.0, 8.0, 16.0]), 4)  # 4 queries: the old score keeps 0.5 ** 0.5
    k = 0.5 ** 0.5
    assert seq.mass == pytest.approx([k * 0.5, k * 1.0 + (1 - k) * 2.0, 4.0])
    # scores are logs of the mass times the recency prior exp(-age / recency), age = tokens from the cache's end
    age = [24, 16, 8]
    want = [np.log(m) - a / pol.recency for m, a in zip([k * 0.5, k + (1 - k) * 2.0, 4.0], age)]
    assert drop.scores(seq, 4) == pytest.approx(want + [float("inf")])
    seq.mass[0] = 0.0  # no mass at all: ranks lowest
    assert drop.scores(seq, 4)[0] == float("-inf")


@pytest.mark.parametrize("recency,dropped", [(0.0, 3), (8.0, 1), (64.0, 3)])
def test_h2o_recency_prior_decides_between_old_heavy_and_new_light_blocks(lm1, recency, dropped):
    """Candidates 1..3 with masses 5, 4, 1: without a prior (0) the lightest (3) goes; with recency 8 tokens the
    scores are log(m) - age / 8, so the oldest block (1) scores lowest despite its mass; at 64 the mass wins."""
    pol = KVPolicy("h2o", budget=48, block_size=8, sinks=4, recent=16, recency=recency)
    r, _ = _run(lm1, pol, list(range(300, 348)), 8)
    r.seq.mass[:] = [0.0, 5.0, 4.0, 1.0, 0.0, 0.0]
    r.seq.seen[:] = [0, 8, 8, 8, 0, 0]
    r.seq.prompt_ids = list(range(300, 356))
    r.chunk(48, 56)
    assert r.seq.block_table == [b for b in range(7) if b != dropped] and r.seq.dropped == 8


# -- the engine --------------------------------------------------------------------------------------------

def _engine(path, **kw):
    from zkv_mlx.engine import Engine
    from zkv_mlx.models.loader import load_model

    return Engine(load_model(path, "float32"), make_config(model=path, block_size=8, kv_dtype="float32",
                                                          kv_cache_memory="8MB", **kw))


def _generate(engine, ids, n, policy=None, watch=None):
    from zkv_mlx.engine.sequence import SamplingParams

    seq = engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), "local",
                             lambda ev: None, policy)
    while engine.has_work():
        engine.step()
        if watch is not None:
            watch(seq)
    return list(seq.output_ids)


@pytest.mark.parametrize("kind,n_prompt", [("window", 40), ("h2o", 40), ("window", 100), ("h2o", 100)])
def test_engine_holds_the_budget_and_matches_the_policy_runner(tiny_model_dir, kind, n_prompt):
    """The engine's pipelined decode under a policy keeps at most budget tokens (+ the block being filled) and
    gives the same greedy tokens as stepping the policy one token at a time through the prefill path."""
    path = str(tiny_model_dir("llama"))
    eng = _engine(path, kv_policy=kind, budget=64, sinks=4, h2o_recent=16)
    prompt = list(range(300, 300 + n_prompt))  # 100: the prompt itself outgrows the budget (chunked prefill)
    most = []
    out = _generate(eng, prompt, 70, watch=lambda s: most.append(len(s.block_table)))
    assert max(most) <= 64 // 8 + 1
    assert eng.policy_dropped_blocks >= 5
    assert eng.blocks.pool.num_used_blocks == 0  # everything released at the end
    # the same policy, token by token, through eval's runner
    from zkv_mlx.eval.ppl import _PolicyRun

    r = _PolicyRun(eng.lm, eng.default_policy, 32)
    ids = list(prompt)
    r.start(ids)
    step = eng.default_policy.chunk
    for s in range(0, len(ids), step):
        logits = r.chunk(s, min(len(ids), s + step))
    ref = []
    for _ in range(70):
        t = int(mx.argmax(logits[-1]).item())
        ref.append(t)
        ids.append(t)
        r.seq.prompt_ids = list(ids)
        logits = r.chunk(len(ids) - 1, len(ids))
    assert out == ref


def test_policy_request_leaves_cached_prefix_blocks_intact(tiny_model_dir):
    """A window request that hits cached blocks copies them before re-rotating keys (copy on write)."""
    path = str(tiny_model_dir("llama"))
    eng = _engine(path)
    prompt = list(range(500, 530))  # fits the budget: a window request may take hits (Sequence.max_hit_tokens)
    first = _generate(eng, prompt, 12)
    win = _generate(eng, prompt, 60, PolicyConfig(kind="window", budget=32, sinks=4))
    assert eng.counters["hit_tokens"] == 24 and eng.policy_dropped_blocks > 0
    again = _generate(eng, prompt, 12)
    assert again == first
    assert win[:4] != [] and eng.blocks.pool.num_used_blocks == 0


QUANT_LOGIT_GAP = 0.5  # as tests/test_storage_matrix.py: quantized K/V are not bitwise equal across paths


@pytest.mark.parametrize("quant,kind", [("int4", "window"), ("int4", "h2o"), ("int8", "window"), ("k8v4", "h2o")])
def test_quantized_cache_under_a_policy(tiny_model_dir, quant, kind):
    """Issue 19: a quantized cache takes window/h2o (it was refused: "needs a float KV cache"). The engine keeps
    the budget, drops and then releases every block, and each greedy token it picks is, under the same policy
    on the same format stepped through eval's runner along the engine's tokens, within QUANT_LOGIT_GAP of the
    best (decode reads packed blocks, the runner dequantized ones; kept keys are re-quantized after rotation)."""
    from zkv_mlx.eval.ppl import _PolicyRun

    path = str(tiny_model_dir("llama"))
    eng = _engine(path, kv_quant=quant, kv_policy=kind, budget=64, sinks=4, h2o_recent=16)
    assert eng.runner.pool.quant is not None
    prompt = list(range(300, 400))  # outgrows the budget during prefill
    most = []
    out = _generate(eng, prompt, 40, watch=lambda s: most.append(len(s.block_table)))
    assert max(most) <= 64 // 8 + 1 and eng.policy_dropped_blocks >= 8
    assert eng.blocks.pool.num_used_blocks == 0
    r = _PolicyRun(eng.lm, eng.default_policy, 32, eng.cfg.kv)
    ids = list(prompt)
    r.start(ids)
    step = eng.default_policy.chunk
    for s in range(0, len(ids), step):
        logits = r.chunk(s, min(len(ids), s + step))
    gaps = []
    for t in out:
        lg = logits[-1]
        gaps.append(float(lg.max() - lg[t]))
        ids.append(t)
        r.seq.prompt_ids = list(ids)
        logits = r.chunk(len(ids) - 1, len(ids))
    assert max(gaps) <= QUANT_LOGIT_GAP, sorted(gaps)[-5:]
    assert sum(g > 0 for g in gaps) <= len(gaps) // 4
