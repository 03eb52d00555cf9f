"""Sliding-window layers hold window-sized memory (issue #16 item 3): window slots live in their own smaller
pool, reached through a logical block -> window block map (engine/window_blocks.py).

Tiny random-weight models built from mlx-lm's own ModelArgs (gemma3_text with 5 local : 1 global layers, llama
with sliding `layer_types`), windows of a few tokens and block size 8 so blocks leave the window in the tests.
"""

import json
from dataclasses import dataclass, field

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

from zkv_mlx.cache import BlockManager
from zkv_mlx.cache.window_blocks import WindowBlocks
from zkv_mlx.config import make_config
from zkv_mlx.engine import Engine, SamplingParams
from zkv_mlx.errors import OutOfKVMemory
from zkv_mlx.models.loader import load_model

WINDOW = 12
CONFIGS = {
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=64, num_hidden_layers=6, intermediate_size=128,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                        sliding_window=WINDOW, sliding_window_pattern=3, max_position_embeddings=512,
                        query_pre_attn_scalar=16, rope_theta=10000.0, rope_local_base_freq=10000.0),
    "llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=3, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=512, tie_word_embeddings=True, sliding_window=WINDOW,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}
PROMPT = ("Paged attention stores keys and values in fixed-size blocks so that a long conversation needs "
          "only the blocks it uses, and a sliding window layer only the last few of them, 1 2 3 4 5 6")


def _write(path, cfg: dict, tokenizer, seed: int = 0):
    from mlx_lm.utils import _get_classes

    cfg = dict(cfg, vocab_size=tokenizer.vocab_size)
    model_class, args_class = _get_classes(cfg)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(cfg))
    new = [(k, mx.ones_like(v) * (0.0 if "gemma" in cfg["model_type"] else 1.0) if k.endswith("norm.weight")
            else mx.random.normal(v.shape) * (0.5 if "embed" in k else 0.15))
           for k, v in tree_flatten(model.parameters())]
    model.load_weights(new)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(cfg))
    tokenizer.save(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bundled_tokenizer):
    cache = {}

    def make(family):
        if family not in cache:
            cache[family] = _write(tmp_path_factory.mktemp(f"win-{family}"), CONFIGS[family], bundled_tokenizer)
        return cache[family]

    return make


def _engine(path, **kw):
    cfg = make_config(model=path, kv_cache_memory=kw.pop("kv_cache_memory", "8MB"), block_size=8, **kw)
    return Engine(load_model(path, cfg.weights_dtype), cfg)


def _run(engine, prompts, n, user="local"):
    seqs = [engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), user,
                               lambda ev: None) for ids in prompts]
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs]


def _greedy(model, ids, n):
    return [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n)]


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
def test_window_model_matches_mlx_lm(family, model_dir, bundled_tokenizer):
    path = model_dir(family)
    ref = load_model(path).model
    ids = bundled_tokenizer.encode(PROMPT)
    assert 30 <= len(ids) <= 60
    engine = _engine(path, prefill_chunk=16)  # chunks both larger and smaller than the window
    (got,) = _run(engine, [ids], 24)
    assert got == _greedy(ref, ids, 24)


def test_window_blocks_are_released(model_dir, bundled_tokenizer):
    """The window group's held blocks stay bounded by its window while the full group grows with the context;
    the tokens still equal mlx-lm's."""
    path = model_dir("gemma3_text")
    ids = bundled_tokenizer.encode(PROMPT)
    engine = _engine(path, prefill_chunk=16)
    wmap = engine.runner.windows.maps[WINDOW]
    seq = engine.add_request(ids, SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True), "local",
                             lambda ev: None)
    held, used = [], []
    while engine.has_work():
        engine.step()
        held.append(wmap.num_held)
        used.append(engine.blocks.num_used_blocks)
    # a 16-row chunk plus the 11 rows before it span at most 5 blocks of 8; a decode step's window at most 3
    assert max(held) <= 5 and wmap.released >= 8
    assert max(used) >= -(-(len(ids) + 59) // 8)
    assert seq.output_ids == _greedy(load_model(path).model, ids, 60)
    # the per-group statistics say the same
    groups = {g["kind"]: g for g in engine.stats()["groups"]}
    assert groups["window"]["window"] == WINDOW and groups["window"]["slots"] == 4
    assert groups["full"]["slots"] == 2 and groups["window"]["blocks_used"] <= 3


def test_prefix_hit_after_release_equals_cold(model_dir, bundled_tokenizer):
    """A second turn extending a finished conversation hits its prefix (whose early window blocks were released)
    and decodes what a cold engine decodes."""
    path = model_dir("gemma3_text")
    ids = bundled_tokenizer.encode(PROMPT)
    engine = _engine(path, prefill_chunk=16)
    (first,) = _run(engine, [ids], 20)
    turn2 = ids + first + bundled_tokenizer.encode(" and then some more words follow here")
    before = engine.stats()["hit_tokens"]
    (got,) = _run(engine, [turn2], 16)
    assert engine.stats()["hit_tokens"] - before >= 40
    assert got == _run(_engine(path, prefill_chunk=16), [turn2], 16)[0]
    assert got == _greedy(load_model(path).model, turn2, 16)
    # forgetting the cache forgets the retained window blocks too
    assert engine.stats()["groups"][1]["blocks_cached"] > 0
    engine.clear_cache()
    assert engine.stats()["groups"][1]["blocks_cached"] == 0


def test_batched_window_decode_equals_alone(model_dir, bundled_tokenizer):
    path = model_dir("llama")
    prompts = [bundled_tokenizer.encode(PROMPT)[:n] for n in (9, 30, 44)]
    together = _run(_engine(path, prefill_chunk=16), prompts, 20)
    for p, got in zip(prompts, together):
        assert got == _run(_engine(path, prefill_chunk=16), [p], 20)[0]


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_window_pools_store_what_one_pool_stores(quant, model_dir, bundled_tokenizer, monkeypatch):
    """Window pools store the engine's KV format (int8, int4 with per-channel keys, tail and sink rows): the
    tokens equal those of an engine keeping every layer in one pool of logical blocks (the same stored bytes)."""
    import zkv_mlx.engine.runner as runner
    import zkv_mlx.engine.sizing as sizing

    path = model_dir("gemma3_text")
    ids = bundled_tokenizer.encode(PROMPT)
    engine = _engine(path, prefill_chunk=16, kv_quant=quant)
    pool = engine.runner.windows.pools[WINDOW]
    assert (pool.quant is None) == (quant == "none") and pool.format_name == engine.kv.format_name
    (got,) = _run(engine, [ids], 24)
    assert engine.runner.windows.maps[WINDOW].released > 0
    monkeypatch.setattr(runner, "window_counts", lambda plan: {})
    monkeypatch.setattr(sizing, "window_counts", lambda plan: {})
    one = _engine(path, prefill_chunk=16, kv_quant=quant)
    assert one.runner.windows is None
    assert got == _run(one, [ids], 24)[0]


def test_ssd_promotion_equals_cold(model_dir, bundled_tokenizer, tmp_path):
    """A conversation whose blocks were evicted to the SSD tier (window rows of its last blocks included) is
    promoted back for the next turn, which decodes what a cold run decodes."""
    path = model_dir("gemma3_text")
    ids = bundled_tokenizer.encode(PROMPT)
    others = [bundled_tokenizer.encode(f"{i} " + PROMPT[::-1]) for i in range(3)]
    engine = _engine(path, prefill_chunk=16, max_num_seqs=2, kv_cache_memory=12 * 12288,
                     ssd_dir=str(tmp_path / "ssd"))
    (first,) = _run(engine, [ids], 12)
    for o in others:  # room for about one conversation: each evicts (spills) the previous one's blocks
        _run(engine, [o], 4)
    engine.ssd.flush()
    assert engine.ssd.spills > 0
    turn2 = ids + first + bundled_tokenizer.encode(" and more")
    hits = engine.stats()["hit_tokens"]
    (got,) = _run(engine, [turn2], 12)
    assert engine.ssd.promotions > 0 and engine.stats()["hit_tokens"] - hits >= 40
    assert got == _greedy(load_model(path).model, turn2, 12)
    engine.close_tiers()


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_session_export_import_equals_cold(quant, model_dir, bundled_tokenizer):
    """A conversation's blocks (window rows of its last blocks included) exported from one engine and imported
    into a fresh one are hits for the next turn, which decodes what a cold engine decodes."""
    path = model_dir("gemma3_text")
    ids = bundled_tokenizer.encode(PROMPT)
    src = _engine(path, prefill_chunk=16, kv_quant=quant)
    (first,) = _run(src, [ids], 12)
    conv = ids + first[:-1]  # the last sampled token has no K/V yet
    blocks = src.full_blocks("local", conv)
    assert len(blocks) == len(conv) // 8
    ks, vs = src.export_kv(blocks)
    assert len(ks) == 6  # every layer, in the model's order
    dst = _engine(path, prefill_chunk=16, kv_quant=quant)
    dst.set_pins(("local", "s"), dst.import_kv("local", conv, ks, vs))
    turn2 = conv + [first[-1]] + bundled_tokenizer.encode(" and more")
    (got,) = _run(dst, [turn2], 12)
    assert dst.stats()["hit_tokens"] == len(conv) // 8 * 8
    assert got == _run(_engine(path, prefill_chunk=16, kv_quant=quant), [turn2], 12)[0]
    if quant == "none":
        assert got == _greedy(load_model(path).model, turn2, 12)


def test_export_is_in_model_layer_order(model_dir, bundled_tokenizer, monkeypatch):
    """Exported rows are per layer in the model's order, as an engine keeping every layer in one pool exports
    them; blocks whose window rows were released carry zero bytes in the window layers."""
    import numpy as np

    import zkv_mlx.engine.runner as runner
    import zkv_mlx.engine.sizing as sizing

    path = model_dir("gemma3_text")
    ids = bundled_tokenizer.encode(PROMPT)

    def export(engine):
        _run(engine, [ids], 1)
        return engine.export_kv(engine.full_blocks("local", ids))

    ks, vs = export(_engine(path, prefill_chunk=16))
    monkeypatch.setattr(runner, "window_counts", lambda plan: {})
    monkeypatch.setattr(sizing, "window_counts", lambda plan: {})
    ks1, vs1 = export(_engine(path, prefill_chunk=16))
    n = len(ids) // 8
    keep = WINDOW // 8  # the blocks a hit after the last full block reads
    for layer, window in enumerate([True, True, False, True, True, False]):
        for got, want in ((ks[layer], ks1[layer]), (vs[layer], vs1[layer])):
            if not window:
                np.testing.assert_array_equal(got, want)
                continue
            np.testing.assert_array_equal(got[n - keep:], want[n - keep:])
            # blocks out of every window stay in the LRU while cached (exported when still mapped): never wrong rows
            for i in range(n):
                assert not np.any(got[i]) or np.array_equal(got[i], want[i])


def test_preemption_with_window_groups_equals_alone(model_dir, bundled_tokenizer):
    """Sequences preempted for lack of blocks (their window blocks given back) and recomputed decode what they
    decode alone."""
    path = model_dir("gemma3_text")
    prompts = [bundled_tokenizer.encode(PROMPT)[:n] for n in (20, 33, 41)]
    engine = _engine(path, prefill_chunk=16, kv_cache_memory=14 * 12288)
    got = _run(engine, prompts, 24)
    assert engine.stats()["preemptions"] > 0
    for p, g in zip(prompts, got):
        assert g == _run(_engine(path, prefill_chunk=16), [p], 24)[0]


# ---------------------------------------------------------------- the window block map (pure bookkeeping)


@dataclass
class WSeq:
    seq_id: int
    block_table: list
    is_finished: bool = False


def test_window_blocks_exact_ids_release_and_retain():
    """W = 12, block size 8: the query at cache index i reads (i - 12, i]."""
    wb = WindowBlocks(num_blocks=4, block_size=8, window=12)
    cached = {}
    wb.hash_of = cached.get
    s = WSeq(0, [10, 11, 12, 13, 14])
    assert wb.acquire(s, 0, 15) == [0, 1]  # prefill 16 rows: logical 10 -> 0, 11 -> 1
    assert wb.acquire(s, 16, 31) == [0, 1, 2, 3]  # row 16 reads (4, 16]: block 10 still in its window
    assert wb.acquire(s, 32, 32) == [-1, -1, 2, 3, 1]  # row 32 reads (20, 32]: 10 and 11 released, 14 takes 1
    assert wb.of == {12: 2, 13: 3, 14: 1} and wb.released == 2 and wb.free_ids == [0]
    cached.update({12: b"h12", 13: b"h13"})
    s.is_finished = True
    wb.reconcile()  # a finished sequence's cached blocks stay mapped (retained), the partial one is freed
    assert dict(wb.retained) == {12: b"h12", 13: b"h13"} and wb.num_held == 0 and wb.free_ids == [0, 1]
    t = WSeq(1, [12, 13, 20])  # a prefix hit of 2 blocks: row 16 reads blocks 12 and 13 again
    assert wb.acquire(t, 16, 16) == [2, 3, 1] and wb.refs == {12: 1, 13: 1, 20: 1}
    t.is_finished = True
    wb.reconcile()
    cached[12] = b"other"  # logical 12 now holds other contents: its retained window block is stale
    with pytest.raises(RuntimeError, match="window rows of block 12"):
        wb.acquire(WSeq(2, [12, 13, 21]), 16, 16)
    assert 12 not in wb.of


def test_window_blocks_out_of_blocks_names_the_fix():
    wb = WindowBlocks(num_blocks=2, block_size=8, window=12)
    wb.acquire(WSeq(0, [1, 2]), 0, 15)
    with pytest.raises(OutOfKVMemory, match="raise --kv-cache-memory"):
        wb.acquire(WSeq(1, [3]), 0, 3)


def test_window_hit_limit_caps_to_mapped_blocks():
    """A hit of k blocks is usable only where blocks [first_block(8k), k) still have window rows."""
    mgr = BlockManager(8, 8)
    wb = WindowBlocks(num_blocks=8, block_size=8, window=12)
    wb.hash_of = lambda lid: mgr.pool.blocks[lid].block_hash
    mgr.hit_limits.append(wb.hit_limit(mgr))

    class Key:
        def block_hash(self, parent, i, toks, bs):
            return bytes([i]) + bytes(toks)

    @dataclass
    class HSeq:
        seq_id: int
        all_ids: list
        block_table: list = field(default_factory=list)
        block_hashes: list = field(default_factory=list)
        num_registered: int = 0
        hash_key: object = field(default_factory=Key)
        is_finished: bool = False

        @property
        def num_tokens(self):
            return len(self.all_ids)

    a = HSeq(0, list(range(33)))
    mgr.allocate(a)
    for first in range(0, 32, 8):
        wb.acquire(a, first, first + 7)  # one block per step: blocks before the window are released
    mgr.register_full_blocks(a, 32)
    assert sorted(wb.of) == a.block_table[1:4]  # row 24 reads (12, 24]: block 0 released
    b = HSeq(1, list(range(33)) + [7])
    assert len(mgr.match_prefix(b)) == 4  # a hit of 4 blocks: row 32 reads blocks 2 and 3, mapped
    c = HSeq(2, list(range(16)) + [9, 9])
    assert len(mgr.match_prefix(c)) == 0  # a hit of 2 blocks: row 16 would read block 0, released


def test_memory_saved_by_window_groups_goes_to_logical_blocks(model_dir, monkeypatch):
    """Within the same kv_cache_memory, window groups take blocks for max_num_seqs sequences (plus as many for
    cached prefixes) and the rest becomes logical blocks: more context than with every layer in one pool."""
    import zkv_mlx.engine.runner as runner
    import zkv_mlx.engine.sizing as sizing

    path = model_dir("gemma3_text")
    budget = 4 << 20
    split = _engine(path, prefill_chunk=16, max_num_seqs=4, kv_cache_memory=budget)
    groups = {g["kind"]: g for g in split.stats()["groups"]}
    # 4 sequences x (a 16-row chunk with 11 rows before it: 5 blocks + a decode window: 3 blocks)
    assert groups["window"]["blocks_total"] == 4 * (5 + 3)
    assert split.stats()["total_size"] <= budget
    monkeypatch.setattr(runner, "window_counts", lambda plan: {})
    monkeypatch.setattr(sizing, "window_counts", lambda plan: {})
    one = _engine(path, prefill_chunk=16, max_num_seqs=4, kv_cache_memory=budget)
    assert split.blocks.num_blocks > 2.5 * one.blocks.num_blocks
