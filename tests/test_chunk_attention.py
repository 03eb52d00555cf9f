"""A short prefill chunk over a sequence's cached blocks, read from the pool (issue 20, the prefix hit's suffix).

`prefill_cpu.paged_chunk_attention` is checked against `mx.fast.scaled_dot_product_attention` with an explicit
causal mask over the gathered K/V, for contiguous, split and scattered block tables, partial last blocks and GQA
ratios; `models.attention._prefill` routes short chunks to it and gives the same result as the tiled path.
"""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from zkv_mlx.kernels import prefill_cpu
from zkv_mlx.kernels.prefill import prefill_attention
from zkv_mlx.kernels.prefill_cpu import paged_chunk_attention
from zkv_mlx.kernels.reference import decode_plan
from zkv_mlx.models import attention
from zkv_mlx.models.attention import attend, prefill_metadata
from zkv_mlx.storage.kv_pool import KVPool

BS = 16


def _tables(nb: int) -> dict[str, list[int]]:
    half = nb // 2
    return {
        "one run": list(range(2, 2 + nb)),
        "two runs": list(range(2, 2 + half)) + list(range(nb + 5, nb + 5 + nb - half)),
        "scattered": [3 + 2 * i for i in range(nb)][::-1],  # more runs than slices pay for: gathered
    }


def _want(q, k_pool, v_pool, ids, n, scale):
    hkv, d = k_pool.shape[1], k_pool.shape[3]
    nb, L = -(-n // BS), q.shape[2]
    idx = mx.array(ids[:nb], dtype=mx.int32)
    k = k_pool[idx].transpose(1, 0, 2, 3).reshape(1, hkv, nb * BS, d)[:, :, :n]
    v = v_pool[idx].transpose(1, 0, 2, 3).reshape(1, hkv, nb * BS, d)[:, :, :n]
    mask = mx.arange(n)[None] <= mx.arange(n - L, n)[:, None]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask), k, v


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (9, 3), (8, 1)])
def test_matches_sdpa_with_explicit_causal_mask(heads):
    hq, hkv = heads
    for i, ((L, n), name) in enumerate(itertools.product([(2, 2), (5, 40), (16, 16), (17, 100), (32, 1000),
                                                          (128, 300)], ["one run", "two runs", "scattered"])):
        nb = -(-n // BS)
        key = mx.random.split(mx.random.key(i), 3)
        k_pool = mx.random.normal((3 * nb + 6, hkv, BS, 32), key=key[0])
        v_pool = mx.random.normal((3 * nb + 6, hkv, BS, 32), key=key[1])
        q = mx.random.normal((1, hq, L, 32), key=key[2]) * 3  # large scores: the row max matters
        ids = _tables(nb)[name]
        got = paged_chunk_attention(q, k_pool, v_pool, decode_plan(ids, n, BS)[0], ids, n, 0.2)
        want, _, _ = _want(q, k_pool, v_pool, ids, n, 0.2)
        assert got.shape == want.shape and got.dtype == mx.float32
        assert not mx.isnan(got).any().item()
        err = mx.abs(got - want).max().item()
        assert err < 2e-5, (hq, hkv, L, n, name, err)


def test_rows_past_the_length_are_never_read():
    # The last block's rows past the sequence (another sequence's, or stale) must not leak in, even as NaN.
    hq, hkv, L, n = 6, 2, 7, 50
    nb = -(-n // BS)
    k_pool = mx.random.normal((nb + 2, hkv, BS, 16))
    v_pool = mx.random.normal((nb + 2, hkv, BS, 16))
    ids = list(range(1, nb + 1))
    want, _, _ = _want(mx.ones((1, hq, L, 16)), k_pool, v_pool, ids, n, 0.25)
    k_pool[ids[-1], :, n % BS:] = float("nan")
    v_pool[ids[-1], :, n % BS:] = float("inf")
    got = paged_chunk_attention(mx.ones((1, hq, L, 16)), k_pool, v_pool, decode_plan(ids, n, BS)[0], ids, n, 0.25)
    assert mx.allclose(got, want, atol=1e-5).item()


def test_small_row_blocks_give_the_same_numbers(monkeypatch):
    # the softmax runs row block by row block; the block size must not change a single number
    hq, hkv, L, n = 6, 3, 20, 333
    nb = -(-n // BS)
    k_pool, v_pool = mx.random.normal((nb + 1, hkv, BS, 16)), mx.random.normal((nb + 1, hkv, BS, 16))
    q = mx.random.normal((1, hq, L, 16))
    ids = list(range(1, nb + 1))
    runs = decode_plan(ids, n, BS)[0]
    big = paged_chunk_attention(q, k_pool, v_pool, runs, ids, n, 0.25)
    monkeypatch.setattr(prefill_cpu, "_CHUNK_BYTES", 4 * n * 3)  # 3 rows a block, the last one shorter
    assert mx.array_equal(paged_chunk_attention(q, k_pool, v_pool, runs, ids, n, 0.25), big).item()


def test_half_precision_pool():
    hq, hkv, L, n = 4, 2, 9, 70
    nb = -(-n // BS)
    k_pool = mx.random.normal((nb + 1, hkv, BS, 16)).astype(mx.float16)
    v_pool = mx.random.normal((nb + 1, hkv, BS, 16)).astype(mx.float16)
    q = mx.random.normal((1, hq, L, 16)).astype(mx.float16)
    ids = list(range(1, nb + 1))
    got = paged_chunk_attention(q, k_pool, v_pool, decode_plan(ids, n, BS)[0], ids, n, 0.25)
    want, _, _ = _want(q.astype(mx.float32), k_pool.astype(mx.float32), v_pool.astype(mx.float32), ids, n, 0.25)
    assert got.dtype == mx.float16
    assert mx.allclose(got.astype(mx.float32), want, atol=3e-3, rtol=3e-3).item()


@pytest.mark.parametrize("L", [1, 2, 32, 128, 129])
def test_attend_routes_short_chunks_over_the_pool_and_agrees_with_the_tiled_path(L, monkeypatch):
    hq, hkv, d, n = 6, 2, 16, 600
    nb = -(-n // BS)
    pool = KVPool(1, nb + 3, hkv, BS, d, mx.float32)
    pool.k[0] = mx.random.normal(pool.k[0].shape)
    pool.v[0] = mx.random.normal(pool.v[0].shape)
    ids = list(range(2, nb + 2))
    meta = prefill_metadata(pool, n - L, None, ids, n, False)
    q = mx.random.normal((1, hq, L, d))
    calls = []
    monkeypatch.setattr(attention, "paged_chunk_attention",
                        lambda *a: calls.append(1) or paged_chunk_attention(*a))
    got = attend(q, 0, meta, 0.25)
    assert len(calls) == (1 if 2 <= L <= attention.CHUNK_MAX_QUERIES else 0)
    k, v = pool.gather(0, ids, n)
    want = prefill_attention(q, k, v, 0.25)  # the tiled path over the gathered K/V
    assert mx.allclose(got, want, atol=2e-5, rtol=1e-5).item()
    # and bitwise equal to it where both run the same numpy exp on the same GEMM rows (one tile)
    if 8 <= L <= attention.CHUNK_MAX_QUERIES:
        assert np.array_equal(np.array(got), np.array(want))


def test_engine_routes_only_short_chunks_and_a_hit_with_suffix_equals_cold(tiny_model_dir, monkeypatch):
    # Cold prefill in whole 256-token chunks never takes the pool path (its code is unchanged); the prefix hit's
    # 12-token suffix does, and its greedy tokens equal a run without the prefix cache.
    from zkv_mlx.config import make_config
    from zkv_mlx.engine import Engine
    from zkv_mlx.engine.sequence import SamplingParams
    from zkv_mlx.models.loader import load_model

    calls = []
    monkeypatch.setattr(attention, "paged_chunk_attention",
                        lambda q, *a: calls.append(q.shape[2]) or paged_chunk_attention(q, *a))

    def run(engine, ids):
        seq = engine.add_request(ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), "local",
                                 lambda ev: None)
        while engine.has_work():
            engine.step()
        return seq.output_ids

    path = str(tiny_model_dir("llama"))

    def engine(**kw):
        return Engine(load_model(path), make_config(model=path, block_size=8, prefill_chunk=256, max_context=1024,
                                                    kv_cache_memory="16MB", **kw))

    prefix = [(37 * i) % 500 + 3 for i in range(512)]
    warm = engine()
    run(warm, prefix)
    assert calls == []  # two 256-token chunks: the tiled path
    got = run(warm, prefix + list(range(40, 52)))
    assert calls and set(calls) == {12}  # the suffix, in every layer
    assert got == run(engine(prompt_cache=False), prefix + list(range(40, 52)))


def test_on_the_gpu_short_chunks_keep_the_fused_path(monkeypatch):
    # ZKV_KERNELS=reference on a Mac GPU: the numpy step would read GPU buffers; MLX's fused SDPA does better there
    hq, hkv, d, n, L = 4, 2, 16, 100, 12
    nb = -(-n // BS)
    pool = KVPool(1, nb + 1, hkv, BS, d, mx.float32)
    pool.k[0] = mx.random.normal(pool.k[0].shape)
    pool.v[0] = mx.random.normal(pool.v[0].shape)
    ids = list(range(1, nb + 1))
    monkeypatch.setattr(attention, "metal_available", lambda: True)
    monkeypatch.setattr(attention, "paged_chunk_attention", lambda *a: pytest.fail("pool path on the GPU"))
    got = attend(mx.random.normal((1, hq, L, d)), 0, prefill_metadata(pool, n - L, None, ids, n, False), 0.25)
    assert got.shape == (1, hq, L, d)


def test_reused_copy_buffers_leave_earlier_results_intact():
    # float32 pools are copied by numpy into per-thread buffers that the next call overwrites: a result returned
    # before must keep its numbers, and a longer context than the buffers hold must grow them.
    hq, hkv, L = 6, 2, 9
    outs, wants = [], []
    for i, n in enumerate([300, 90, 2500]):
        nb = -(-n // BS)
        key = mx.random.split(mx.random.key(100 + i), 3)
        k_pool = mx.random.normal((2 * nb + 6, hkv, BS, 16), key=key[0])
        v_pool = mx.random.normal((2 * nb + 6, hkv, BS, 16), key=key[1])
        q = mx.random.normal((1, hq, L, 16), key=key[2])
        ids = _tables(nb)["two runs" if i == 1 else "one run"]
        outs.append(paged_chunk_attention(q, k_pool, v_pool, decode_plan(ids, n, BS)[0], ids, n, 0.25))
        wants.append(_want(q, k_pool, v_pool, ids, n, 0.25)[0])
    for got, want in zip(outs, wants):
        assert mx.allclose(got, want, atol=2e-5).item()
