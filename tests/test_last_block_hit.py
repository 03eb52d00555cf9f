"""A prompt of whole blocks, all cached: only its last token is computed (issue #20 item 2).

The hit covers num_tokens - 1 positions (the last block's K/V are copied into the sequence's own block), the
greedy tokens equal a run without any prefix cache, and the cached block itself is never written.
"""

import mlx.core as mx
import numpy as np
import pytest

from zkv_mlx.config import make_config
from zkv_mlx.engine import Engine
from zkv_mlx.engine.sequence import SamplingParams
from zkv_mlx.models.loader import load_model

BS = 8


def _engine(path, **kw):
    return Engine(load_model(path), make_config(model=path, block_size=BS, kv_cache_memory="16MB", **kw))


def _run(engine, ids, n=12):
    usage = {}

    def listener(ev):
        if ev.kind == "error":
            raise ev.error
        if ev.kind == "done":
            usage.update(ev.usage)

    seq = engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), "local", listener)
    while engine.has_work():
        engine.step()
    return seq.output_ids, usage.get("cached_tokens", 0)


def _block_rows(engine, block_id):
    pool = engine.runner.pool
    out = []
    for arrs in (pool.k, pool.v):
        for a in arrs:
            parts = a if isinstance(a, (list, tuple)) else [a]
            out += [np.array(p[block_id].astype(mx.float32)) for p in parts]
    return out


@pytest.mark.parametrize("kv", [{"kv_dtype": "float32"}, {"kv_dtype": "float16"}, {"kv_quant": "int8"}])
def test_whole_block_prompt_hit_computes_only_the_last_token(kv, tiny_model_dir, bundled_tokenizer):
    path = str(tiny_model_dir("llama"))
    ids = bundled_tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    ids = ids[: len(ids) // BS * BS]
    assert len(ids) >= 3 * BS
    plain = _engine(path, prompt_cache=False, **kv)
    want, _ = _run(plain, ids)
    cached = _engine(path, **kv)
    cold, cold_hit = _run(cached, ids)
    assert cold_hit == 0
    src = _cached_last_block(cached, ids)
    assert src is not None
    before = _block_rows(cached, src.block_id)
    hit, hit_tokens = _run(cached, ids)
    assert hit_tokens == len(ids) - 1
    assert hit == cold == want
    after = _block_rows(cached, src.block_id)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))  # the cached block was only read


def _cached_last_block(engine, ids):
    """The block the prefix cache holds for the prompt's last full block (looked up like a new request)."""
    seq = engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0), "local", lambda ev: None)
    block = engine.blocks.cached_block(seq, len(ids) // BS - 1)
    engine.cancel(seq)
    while engine.has_work():
        engine.step()
    return block


def test_partial_last_block_keeps_the_block_hit(tiny_model_dir, bundled_tokenizer):
    path = str(tiny_model_dir("llama"))
    ids = bundled_tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    ids = ids[: len(ids) // BS * BS - 3]  # the last block is partial: never cached
    cached = _engine(path)
    _run(cached, ids)
    _, hit_tokens = _run(cached, ids)
    assert hit_tokens == len(ids) // BS * BS


@pytest.mark.parametrize("kv", [{"kv_dtype": "float32"}, {"kv_quant": "int4"}])
def test_copy_block_copies_one_block_of_every_layer(kv, tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    eng = _engine(path, **kv)
    pool = eng.runner.pool
    for arrs in (pool.k, pool.v):  # distinct contents per block
        for i, x in enumerate(arrs):
            for a in (x if isinstance(x, (list, tuple)) else (x,)):
                a[...] = (mx.random.uniform(shape=a.shape) * 1000).astype(a.dtype)
    mx.eval(pool.k, pool.v)
    others = [b for b in range(pool.num_blocks) if b not in (3, 5)]
    before = {b: _block_rows(eng, b) for b in (3, 5, others[0], others[-1])}
    eng.runner.copy_block(3, 5)
    assert all(np.array_equal(a, b) for a, b in zip(_block_rows(eng, 5), before[3]))
    for b in (3, others[0], others[-1]):
        assert all(np.array_equal(x, y) for x, y in zip(_block_rows(eng, b), before[b]))
