"""Every KV format through every storage path a block can take (issue 17, section 1).

Formats come from the config's own lists (`KV_DTYPES`, `KV_QUANTS`, `KEY_LAYOUTS`), so a new one is covered by
adding it there. Paths: memory prefix hit; spill to SSD and promote in the same process; promote in a fresh engine
on the same SSD directory (what a new process does: read the index from disk); session save/load; export/import;
preemption and resume; window/h2o policies (float formats; quantized ones must refuse with a typed error).
In every cell the greedy tokens equal a cold run (an engine without prompt cache) and the hit/promotion counters
move by the exact number of blocks.

One scenario per format runs every path once in a module fixture (tiny random llama, pools of 320 tokens), and
each test checks one path's record, so a failure names its format and path.
"""

import random

import mlx.core as mx
import pytest

from zkv_mlx import ZKV
from zkv_mlx.cache.policy import KVPolicy
from zkv_mlx.config import KEY_LAYOUTS, KV_DTYPES, KV_QUANTS, KVCacheConfig, make_config
from zkv_mlx.errors import ConfigError
from zkv_mlx.kernels.kv_quant import QuantSpec
from zkv_mlx.models.loader import load_model
from zkv_mlx.storage.kv_pool import KVPool


def _formats() -> dict[str, dict]:
    """name -> ZKV kwargs of every distinct KV format the config offers."""
    out = {d: {"kv_dtype": d} for d in KV_DTYPES if d != "auto"}
    for q in KV_QUANTS:
        if q == "none":
            continue
        seen = set()
        for layout in KEY_LAYOUTS:  # "auto" is one of the explicit layouts: keep each distinct one once
            channel = KVCacheConfig(quant=q, key_layout=layout).channel_keys
            if channel not in seen:
                seen.add(channel)
                out[f"{q}-{'channel' if channel else 'token'}-keys"] = {"kv_quant": q, "kv_key_layout": layout}
    return out


FORMATS = _formats()
POOL_TOKENS = 320  # 20 blocks of 16 or 10 of 32: the long prompt below takes all of them
N_OUT = 8
MESSAGE = ("Paged attention keeps keys and values in fixed-size blocks, so a repeated prefix is computed once "
           "and then read back from memory or from the disk tier. ") * 2


def _ids(rng, n):
    return [rng.randrange(10, 400) for _ in range(n)]


def _run(m, ids, n=N_OUT, **kw):
    out = []
    for ev in m.submit(ids, temperature=0.0, max_tokens=n, ignore_eos=True, **kw):
        if ev.kind == "error":
            raise ev.error
        if ev.token_id is not None:
            out.append(ev.token_id)
    return out


def _run_many(m, prompts, n):
    handles = [m.submit(ids, temperature=0.0, max_tokens=n, ignore_eos=True) for ids in prompts]
    outs = []
    for h in handles:
        evs = list(h)
        assert evs[-1].kind == "done", evs[-1].error
        outs.append([ev.token_id for ev in evs if ev.token_id is not None])
    return outs


def _counters(m) -> dict:
    s = m.kv_cache_stats()
    return {k: s[k] for k in ("hit_tokens", "ssd_promotions", "ssd_spills", "preemptions", "policy_dropped_blocks")}


def _delta(before, after) -> dict:
    return {k: after[k] - before[k] for k in before}


def _pool_memory(path: str, fmt: dict) -> tuple[int, int]:
    """(block size, bytes for POOL_TOKENS tokens) of this format, as the engine sizes its pool."""
    cfg = make_config(model=path, **fmt)
    lm = load_model(path, cfg.weights_dtype)
    dtype = lm.dtype if cfg.kv.dtype == "auto" else getattr(mx, cfg.kv.dtype)
    bs = cfg.kv.block_size
    per_block = KVPool.bytes_per_block(lm.n_layers, lm.n_kv_heads, bs, lm.head_dim, dtype,
                                       QuantSpec.from_config(cfg.kv))
    return bs, per_block * (POOL_TOKENS // bs)


@pytest.fixture(scope="module")
def _load_once():
    # Every engine of this module loads the same tiny model: load it once (weights are read-only; each engine
    # still builds its own pool, SSD index and sessions, which is what the paths below exercise).
    from zkv_mlx.engine import thread as engine_mod  # EngineThread loads the model

    loaded = {}
    real = engine_mod.load_model

    def load(spec, weights_dtype="auto"):
        if (spec, weights_dtype) not in loaded:
            loaded[spec, weights_dtype] = real(spec, weights_dtype)
        return loaded[spec, weights_dtype]

    mp = pytest.MonkeyPatch()
    mp.setattr(engine_mod, "load_model", load)
    yield
    mp.undo()


@pytest.fixture(scope="module", params=list(FORMATS), ids=list(FORMATS))
def scenario(request, tiny_model_dir, tmp_path_factory, _load_once):
    name, fmt = request.param, FORMATS[request.param]
    path = str(tiny_model_dir("llama"))
    bs, memory = _pool_memory(path, fmt)
    tmp = tmp_path_factory.mktemp(f"matrix-{name}")
    rng = random.Random(17)
    p = _ids(rng, 100)  # 96 tokens in full blocks at block size 16 or 32, then a partial block
    q = _ids(rng, POOL_TOKENS - 4)  # needs every block of the pool: evicts (spills) all of p's cached blocks
    r = [_ids(rng, 60) for _ in range(4)]  # 4 x (60 + 24) tokens > the pool: preemption
    quantized = "kv_quant" in fmt
    # A window request takes hits while it fits its budget (112 > 100 + 1), not when the prompt alone outgrows
    # it (64); h2o never does (Sequence.max_hit_tokens). Decode drops blocks in every case.
    # At block size 32 (per-channel keys) the least budgets are larger: the tight window then gets a longer
    # prompt and every policy more output tokens, so that the same three cases hold.
    def least(kind, want, recent=None):
        return max(want, KVPolicy(kind, 0, bs, 4, recent).min_budget)

    tight_prompt = p if bs == 16 else p + _ids(random.Random(5), 100)
    n_pol = max(24, least("h2o", 112, 16) - len(p) + 16)  # 28 at block size 16, 76 at 32
    policies = {"window": (p, dict(kv_policy="window", budget=least("window", 112), sinks=4)),
                "window-tight": (tight_prompt, dict(kv_policy="window", budget=least("window", 64), sinks=4)),
                "h2o": (p, dict(kv_policy="h2o", budget=least("h2o", 112, 16), sinks=4, h2o_recent=16))}
    rec = {"name": name, "fmt": fmt, "path": path, "r": r, "bs": bs, "full": len(p) // bs * bs, "quantized": quantized,
           "policy_hits": {"window": len(p) // bs * bs, "window-tight": 0, "h2o": 0}}
    turn2 = {"role": "user", "content": "And in one sentence?"}

    # Cold references: no prompt cache, no SSD.
    with ZKV(path, prompt_cache=False, ssd_cache="off", kv_cache_memory="16MB", **fmt) as cold:
        rec["cold_p"] = _run(cold, p)
        rec["cold_r"] = [_run(cold, x, 24) for x in r]
        rec["cold_turn1"] = cold.chat(MESSAGE, temperature=0, max_tokens=N_OUT, ignore_eos=True)
        history = [{"role": "user", "content": MESSAGE}, {"role": "assistant", "content": rec["cold_turn1"]}]
        rec["cold_turn2"] = cold.chat(history + [turn2], temperature=0, max_tokens=N_OUT, ignore_eos=True)
    # Policy references in the prefill chunks of the engines below, so that quantized K/V round identically too.
    with ZKV(path, prompt_cache=False, ssd_cache="off", kv_cache_memory="16MB", prefill_chunk=32, **fmt) as cold:
        rec["cold_policy"] = {k: _run(cold, pr, n_pol, **kw) for k, (pr, kw) in policies.items()}

    ssd = dict(ssd_dir=str(tmp / "ssd"), kv_cache_memory=memory, max_num_seqs=4, prefill_chunk=32)
    with ZKV(path, **ssd, **fmt) as a:
        c0 = _counters(a)
        rec["first"] = (_run(a, p), _delta(c0, c1 := _counters(a)))
        rec["memory_hit"] = (_run(a, p), _delta(c1, c2 := _counters(a)))
        _run(a, q, 1)
        a._thread.call(lambda e: e.ssd.flush())
        c3 = _counters(a)
        rec["spill"] = _delta(c2, c3)
        rec["ssd_same"] = (_run(a, p), _delta(c3, c4 := _counters(a)))
        rec["preempt"] = (_run_many(a, r, 24), _delta(c4, _counters(a)))
        s = a.create_session(f"conv-{name}")
        rec["turn1"] = s.chat(MESSAGE, temperature=0, max_tokens=N_OUT, ignore_eos=True)
        rec["turn1_ids"] = list(s.token_ids)
        s.save()
        s.export(tmp / "conv.zkvs")
    # The same conversation continued in one engine of the same settings, no file in between: a restored session
    # must give exactly these tokens (its blocks are the same bytes), quantized or not.
    with ZKV(path, ssd_cache="off", kv_cache_memory=memory, max_num_seqs=4, prefill_chunk=32, **fmt) as live_engine:
        live = live_engine.create_session(f"live-{name}")
        assert live.chat(MESSAGE, temperature=0, max_tokens=N_OUT, ignore_eos=True) == rec["turn1"]
        rec["live_turn2"] = live.chat([turn2], temperature=0, max_tokens=N_OUT, ignore_eos=True)
        live_engine.delete_session(f"live-{name}")
    # A fresh engine on the same directories: the SSD index and session files are all it has (a new process
    # reads nothing else from the first one).
    with ZKV(path, **ssd, **fmt) as b:
        rec["dropped_at_start"] = b._thread.call(lambda e: e.ssd.dropped_at_start)
        rec["ssd_blocks_at_start"] = b.kv_cache_stats()["ssd_blocks"]
        c0 = _counters(b)
        rec["ssd_fresh"] = (_run(b, p), _delta(c0, c1 := _counters(b)))
        loaded = b.load_session(f"conv-{name}")
        rec["loaded"] = (loaded.chat([turn2], temperature=0, max_tokens=N_OUT, ignore_eos=True),
                         _delta(c1, c2 := _counters(b)))
        rec["loaded_ids"] = list(loaded.token_ids)
        imported = b.import_session(str(tmp / "conv.zkvs"), name=f"imported-{name}")
        rec["imported"] = (imported.chat([turn2], temperature=0, max_tokens=N_OUT, ignore_eos=True),
                           _delta(c2, c3 := _counters(b)))
        rec["imported_ids"] = list(imported.token_ids)
        rec["policy"] = {}
        for kind, (pr, kw) in policies.items():
            try:
                rec["policy"][kind] = (_run(b, pr, n_pol, **kw), _delta(c3, c3 := _counters(b)))
            except ConfigError as e:
                rec["policy"][kind] = e
    return rec


def test_memory_prefix_hit(scenario):
    toks, d = scenario["first"]
    assert toks == scenario["cold_p"] and d["hit_tokens"] == 0
    toks, d = scenario["memory_hit"]
    assert toks == scenario["cold_p"]
    assert d["hit_tokens"] == scenario["full"] == 96 and d["ssd_promotions"] == 0


def test_spill_and_promote_in_the_same_engine(scenario):
    full_blocks = scenario["full"] // scenario["bs"]
    assert scenario["spill"]["ssd_spills"] >= full_blocks  # every cached block of p went to SSD
    toks, d = scenario["ssd_same"]
    assert toks == scenario["cold_p"]
    assert d["hit_tokens"] == scenario["full"] and d["ssd_promotions"] == full_blocks


def test_promote_in_a_fresh_engine(scenario):
    # The input: int4/k8v4 block files were rejected as torn at start-up (dropped, 0 hits).
    assert scenario["dropped_at_start"] == 0 and scenario["ssd_blocks_at_start"] > 0
    toks, d = scenario["ssd_fresh"]
    assert toks == scenario["cold_p"]
    assert d["hit_tokens"] == scenario["full"] and d["ssd_promotions"] == scenario["full"] // scenario["bs"]


# A preempted sequence is recomputed in other prefill chunks than it was first computed in (its generated tokens
# were decoded one at a time). For float KV that moves nothing visible: the tokens equal a cold run. Quantized KV is
# not bitwise reproducible across schedules: a GEMM of another shape rounds a key or value ~1e-7 differently, which
# now and then moves it across a 4-bit rounding boundary (measured: logits of the same prompt prefilled in chunks
# of 16 vs 512 differ by 1e-5 for float and int8, up to ~1 for int4 on this random tiny model). So for quantized
# formats the promise is the one style.md states, close logits: every token the resumed run picked is, under a
# cold engine's logits along the same tokens (teacher forced), within QUANT_LOGIT_GAP of the best one.
QUANT_LOGIT_GAP = 0.5


def _assert_close_to_cold(scenario, runs) -> None:
    # runs: (prompt ids, generated ids); every generated token within QUANT_LOGIT_GAP of a cold engine's best
    gaps = []
    with ZKV(scenario["path"], prompt_cache=False, ssd_cache="off", kv_cache_memory="16MB", **scenario["fmt"]) as cold:
        for prompt, out in runs:
            for k, t in enumerate(out):
                lg = cold.next_token_logits(prompt + out[:k])
                gaps.append(float(lg.max() - lg[t]))
    assert max(gaps) <= QUANT_LOGIT_GAP, (scenario["name"], sorted(gaps)[-5:])
    assert sum(g > 0 for g in gaps) <= len(gaps) // 4  # mostly the cold run's own choices


def test_preemption_and_resume(scenario):
    toks, d = scenario["preempt"]
    assert d["preemptions"] > 0
    if not scenario["quantized"]:
        assert toks == scenario["cold_r"]
        return
    assert all(len(out) == 24 for out in toks)
    _assert_close_to_cold(scenario, list(zip(scenario["r"], toks)))


def _assert_turn2_like_cold(scenario, key) -> None:
    # A restored session's turn-1 reply was decoded one token at a time, where the cold run prefills it with turn 2:
    # float KV gives the cold run's tokens; quantized KV is held to close logits, as preemption above (the reply's
    # keys/values differ by ~1e-6 between decode and prefill, which 4-bit rounding can turn into a near-tie flip:
    # int4 with e4m3 key metadata flips one token of this conversation, not of three reworded ones).
    reply, _ = scenario[key]
    assert reply == scenario["live_turn2"]  # the round trip itself is exact
    if not scenario["quantized"]:
        assert reply == scenario["cold_turn2"]
        return
    ids = scenario[key + "_ids"]
    _assert_close_to_cold(scenario, [(ids[:-N_OUT], ids[-N_OUT:])])


def test_session_save_and_load(scenario):
    assert scenario["turn1"] == scenario["cold_turn1"]
    _assert_turn2_like_cold(scenario, "loaded")
    _, d = scenario["loaded"]
    # the restored blocks hold every full block of turn 1's prompt: they are hits, not recomputed
    assert d["hit_tokens"] >= (len(scenario["turn1_ids"]) - N_OUT) // scenario["bs"] * scenario["bs"] > 0
    assert d["hit_tokens"] % scenario["bs"] == 0 and d["ssd_promotions"] == 0


def test_session_export_and_import(scenario):
    _assert_turn2_like_cold(scenario, "imported")
    _, d = scenario["imported"]
    assert d["hit_tokens"] >= (len(scenario["turn1_ids"]) - N_OUT) // scenario["bs"] * scenario["bs"] > 0
    assert d["ssd_promotions"] == 0


@pytest.mark.parametrize("kind", ["window", "window-tight", "h2o"])
def test_long_context_policy(scenario, kind):
    # Every format, quantized ones too (issue 19): hits from the SSD tier, blocks dropped, tokens of a cold run.
    got = scenario["policy"][kind]
    assert not isinstance(got, Exception), got
    toks, d = got
    assert toks == scenario["cold_policy"][kind]
    assert d["hit_tokens"] == scenario["policy_hits"][kind] and d["policy_dropped_blocks"] > 0
