"""Prefix caching through the engine and API: multi-turn reuse, isolation between users, hit == miss."""

import pytest

from zkv_mlx import ZKV
from zkv_mlx.config import make_config
from zkv_mlx.engine import Engine
from zkv_mlx.models.loader import load_model

from test_equivalence import PROMPTS, run_engine

SYSTEM = ("You are a meticulous assistant for a small team. Answer briefly, cite the relevant section of the "
          "team handbook when you can, and never reveal one member's notes to another member.")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    m = ZKV(kv_cache_memory="256MB", prefixes=[{"name": "team", "content": SYSTEM, "preload": True, "shared": True}])
    yield m
    m.close()


def run(model, ids, user, **kw):
    handle = model.submit(ids, user=user, temperature=0.0, max_tokens=kw.pop("max_tokens", 16), **kw)
    out, usage = [], None
    for ev in handle:
        if ev.kind == "error":
            raise ev.error
        if ev.token_id is not None:
            out.append(ev.token_id)
        if ev.kind == "done":
            usage = ev.usage
    return out, usage


def test_preloaded_prefix_is_pinned(model):
    s = model.kv_cache_stats()
    n_ids = len(model.tokenizer.encode_chat([{"role": "system", "content": SYSTEM}], add_generation_prompt=False))
    assert s["blocks_pinned"] == n_ids // s["block_size"] > 0
    assert "pinned" in model.kv_block_map()
    model.clear_kv_cache()
    assert model.kv_cache_stats()["blocks_pinned"] == s["blocks_pinned"]


def test_multi_turn_hits_every_full_block_of_previous_prompt_and_reply(model):
    tok = model.tokenizer
    bs = model.kv_cache_stats()["block_size"]
    msgs = [{"role": "user", "content": "Name three colours of the rainbow."}]
    ids1 = tok.encode_chat(msgs)
    reply_ids, _ = run(model, ids1, "turns", max_tokens=40)
    reply = tok.decode(reply_ids)
    msgs2 = msgs + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And two more?"}]
    ids2 = tok.encode_chat(msgs2)
    assert ids2[: len(ids1) + len(reply_ids)] == ids1 + reply_ids  # the template re-renders the same tokens
    _, usage = run(model, ids2, "turns")
    assert usage["cached_tokens"] == (len(ids1) + len(reply_ids)) // bs * bs


def test_users_isolated_but_share_the_preloaded_system_prompt(model):
    tok = model.tokenizer
    bs = model.kv_cache_stats()["block_size"]
    shared = len(tok.encode_chat([{"role": "system", "content": SYSTEM}], add_generation_prompt=False)) // bs * bs
    private = [{"role": "system", "content": SYSTEM},
               {"role": "user", "content": "My private notes: the launch code word is AUBERGINE. " * 4}]
    before = model.kv_cache_stats()["per_user"]
    model.chat(private, user="alice", temperature=0, max_tokens=4)
    model.chat(private, user="alice", temperature=0, max_tokens=4)
    model.chat(private, user="bob", temperature=0, max_tokens=4)
    per_user = model.kv_cache_stats()["per_user"]
    alice = per_user["alice"]["hit_tokens"] - before.get("alice", {}).get("hit_tokens", 0)
    bob = per_user["bob"]["hit_tokens"] - before.get("bob", {}).get("hit_tokens", 0)
    assert bob == shared  # the shared system prompt only: nothing of alice's private turn
    n = len(tok.encode_chat(private))
    assert alice == shared + (n - 1) // bs * bs  # first request: shared part; second: everything but the last


def test_stats_keys(model):
    s = model.kv_cache_stats()
    for k in ("total_size", "used_size", "blocks_total", "blocks_used", "blocks_cached", "blocks_free",
              "prompt_cache_hits", "prompt_cache_misses", "hit_tokens", "miss_tokens", "hit_rate", "evictions",
              "fragmentation", "per_user"):
        assert k in s
    assert s["prompt_cache_hits"] >= 1 and 0 < s["hit_rate"] < 1
    assert s["blocks_used"] == s["blocks_pinned"]  # nothing running


@pytest.mark.parametrize("kv_dtype", ["float16", "float32"])
def test_hit_and_miss_give_identical_greedy_tokens(kv_dtype, tiny_model_dir, bundled_tokenizer):
    path = str(tiny_model_dir("llama"))
    ids = [bundled_tokenizer.encode(p * 3) for p in PROMPTS]
    cached = Engine(load_model(path), make_config(model=path, block_size=8, kv_dtype=kv_dtype,
                                                   kv_cache_memory="16MB"))
    miss = run_engine(cached, ids, 24)
    hit = run_engine(cached, ids, 24)
    assert cached.counters["hit_tokens"] > 0
    plain = Engine(load_model(path), make_config(model=path, block_size=8, kv_dtype=kv_dtype,
                                                  kv_cache_memory="16MB", prompt_cache=False))
    assert hit == miss == run_engine(plain, ids, 24)
    assert plain.counters["hit_tokens"] == 0
