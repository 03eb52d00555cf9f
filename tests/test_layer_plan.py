"""The layer plan comes from the model itself (make_cache + a probe), and what the engine lacks is refused."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import cache as C

from zkv_mlx import ZKV
from zkv_mlx.config import make_config
from zkv_mlx.engine import Engine, SamplingParams
from zkv_mlx.errors import ConfigError, ModelLoadError
from zkv_mlx.models.layer_plan import build_plan
from zkv_mlx.models.loader import load_model

PROMPT = [(i * 13) % 200 + 1 for i in range(37)]


def run(engine, prompts, n=16):
    seqs = [engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), "local",
                               lambda ev: None) for p in prompts]
    while engine.has_work():
        engine.step()
    return seqs


def engine_for(path, **kw):
    return Engine(load_model(str(path)), make_config(model=str(path), kv_cache_memory="64MB", block_size=8,
                                                     prefill_chunk=16, **kw))


def test_plan_kinds_come_from_make_cache(tiny_model_dir):
    swa = load_model(str(tiny_model_dir("llama_swa"))).plan
    assert [s.window for s in swa.slots] == [6, None, 6, None]
    assert swa.n_kv_heads == 2 and swa.head_dim == 16 and not swa.has_state
    hybrid = load_model(str(tiny_model_dir("qwen3_next"))).plan
    assert [t[0] for t in hybrid.template] == ["state", "kv", "state", "kv"]
    assert hybrid.n_state == 2 and len(hybrid.paged_slots) == 2


def test_sliding_window_llama_equals_mlx_lm(tiny_model_dir):
    # The example: before the generic attachment this config loaded and ignored the window.
    path = tiny_model_dir("llama_swa")
    ref = load_model(str(path)).model
    want = [int(t) for t, _ in generate_step(mx.array(PROMPT), ref, max_tokens=16)]
    seqs = run(engine_for(path), [PROMPT, PROMPT[:9], PROMPT[:23]])
    assert seqs[0].output_ids == want
    for s, p in zip(seqs[1:], (PROMPT[:9], PROMPT[:23])):
        assert s.output_ids == [int(t) for t, _ in generate_step(mx.array(p), ref, max_tokens=16)]


class _Unimplemented:
    """A model whose make_cache declares a cache kind the engine does not implement."""

    def __init__(self, cache):
        self._cache = cache
        self.layers = [None]

    def make_cache(self):
        return [self._cache]


@pytest.mark.parametrize("cache, words", [
    (C.RotatingKVCache(max_size=8, keep=4), "keeps its first 4 tokens"),
    (C.ChunkedKVCache(chunk_size=8), "ChunkedKVCache"),
])
def test_unimplemented_cache_kinds_refuse_to_load(cache, words):
    with pytest.raises(ModelLoadError, match=words):
        build_plan(_Unimplemented(cache))


def test_hybrid_second_turn_reuses_the_first_turns_prefix_and_equals_a_cold_run(tiny_model_dir):
    path = tiny_model_dir("qwen3_next")
    eng = engine_for(path)
    first = run(eng, [PROMPT])[0]
    turn2 = PROMPT + first.output_ids + [5, 6, 7, 8, 9, 10, 11]
    second = run(eng, [turn2])[0]
    assert second.num_cached_tokens == 48  # the last block boundary of turn 1 (37 + 16 = 53 tokens)
    cold = run(engine_for(path), [turn2])[0]
    assert second.output_ids == cold.output_ids
    # the same prompt again: prefill chunks ended on boundaries 16 and 32, where snapshots were taken
    again = run(eng, [PROMPT])[0]
    assert again.num_cached_tokens == 32 and again.output_ids == first.output_ids


def test_hybrid_batch_equals_each_alone(tiny_model_dir):
    eng = engine_for(tiny_model_dir("qwen3_next"), prompt_cache=False)
    prompts = [PROMPT, PROMPT[:11], PROMPT[:26]]
    alone = [run(eng, [p])[0].output_ids for p in prompts]
    assert [s.output_ids for s in run(eng, prompts)] == alone


def test_hybrid_session_file_carries_the_state(tiny_model_dir, tmp_path):
    path = str(tiny_model_dir("qwen3_next"))
    z = ZKV(path, kv_cache_memory="64MB", block_size=8, prefill_chunk=16)
    s = z.create_session("hyb")
    s.chat([{"role": "user", "content": "a message long enough to fill a few blocks of the cache"}], max_tokens=12,
           temperature=0)
    f = s.export(tmp_path / "hyb.zkvs")
    want = z.next_token_logits(s.token_ids)
    z.close()
    z2 = ZKV(path, kv_cache_memory="64MB", block_size=8, prefill_chunk=16)
    s2 = z2.import_session(str(f), name="hyb2")
    before = z2.kv_cache_stats()["hit_tokens"]
    got = z2.next_token_logits(s2.token_ids)
    assert z2.kv_cache_stats()["hit_tokens"] - before == len(s2.token_ids) // 8 * 8
    np.testing.assert_allclose(got, want, atol=1e-4)
    z2.close()


def test_policies_are_refused_on_models_they_do_not_handle(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"llama has sliding-window layers \(window 6\)"):
        engine_for(tiny_model_dir("llama_swa"), kv_policy="window", budget=64)


def test_doctor_prints_the_layer_plan(tiny_model_dir):
    out = subprocess.run([sys.executable, "-m", "zkv_mlx.cli", "doctor", "--json", "--model",
                          str(tiny_model_dir("llama_swa"))], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    kinds = {(g["kind"], g["window"], g["slots"]) for g in d["groups"]}
    assert kinds == {("window", 6, 2), ("full", None, 2)}
    assert all(g["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4 for g in d["groups"])  # slots*heads*(K+V)*dim*f32


def test_window_model_repeated_prompt_hits_after_its_blocks_left_the_window(tiny_model_dir):
    # Window blocks that leave the window stay in the window pool's LRU while their logical block is cached, so
    # the same prompt again (its last blocks long out of the window of the first run's decode) still hits.
    eng = engine_for(tiny_model_dir("llama_swa"))
    first = run(eng, [PROMPT], n=24)[0]
    again = run(eng, [PROMPT], n=24)[0]
    assert again.num_cached_tokens == 32 and again.output_ids == first.output_ids
