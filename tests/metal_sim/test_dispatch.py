"""The dispatcher with the simulator standing in for mx.fast.metal_kernel: ZKV_KERNELS routing, the fallback
with one warning, and the Metal path equal to the reference path (random pools, then a real generation)."""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from zkv_mlx.errors import ConfigError, KernelError
from zkv_mlx.kernels import dispatch, kernel_path, metal, paged_attention, registry
from zkv_mlx.kernels.kv_format import ChannelKeyPool, quantize_pool
from zkv_mlx.kernels.kv_quant import QuantSpec
from zkv_mlx.kernels.reference import paged_attention_reference
from zkv_mlx.kernels.reference_quant import paged_attention_reference_quantized
from zkv_mlx.storage.kv_pool import KVPool

from . import fake_metal_kernel, stats


@pytest.fixture
def sim(monkeypatch):
    monkeypatch.setattr(mx.fast, "metal_kernel", fake_metal_kernel)
    registry.clear()
    dispatch.reset()
    yield
    registry.clear()
    dispatch.reset()


def random_case(seed, dtype=mx.float16, batch=4, n_heads=6, n_kv=2, d=64, bs=16, nb=64, max_ctx=200):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, max_ctx, batch).astype(np.int32)
    max_blocks = int(-(-lens.max() // bs))
    tables = rng.permutation(nb)[:batch * max_blocks].reshape(batch, max_blocks).astype(np.int32)
    mx.random.seed(seed)
    q = mx.random.normal((batch, n_heads, 1, d)).astype(dtype)
    k = mx.random.normal((nb, n_kv, bs, d)).astype(dtype)
    v = mx.random.normal((nb, n_kv, bs, d)).astype(dtype)
    return q, k, v, mx.array(tables), mx.array(lens), int(lens.max())


def test_kernel_path_choices(monkeypatch):
    monkeypatch.setenv("ZKV_KERNELS", "reference")
    assert kernel_path() == "reference"
    monkeypatch.setenv("ZKV_KERNELS", "metal")
    assert kernel_path() == "metal"
    monkeypatch.setenv("ZKV_KERNELS", "auto")
    assert kernel_path() == ("metal" if dispatch.metal_available() else "reference")
    monkeypatch.setenv("ZKV_KERNELS", "cuda")
    with pytest.raises(ConfigError, match="ZKV_KERNELS"):
        kernel_path()


@pytest.mark.parametrize("seed,batch,max_ctx", [(0, 4, 200), (1, 4, 200), (2, 1, 1000)])  # the last: two passes
def test_metal_path_equals_reference_path(seed, batch, max_ctx, sim, monkeypatch):
    q, k, v, tables, lens, max_len = random_case(seed, batch=batch, max_ctx=max_ctx)
    monkeypatch.setenv("ZKV_KERNELS", "reference")
    before = stats["launches"]
    want = paged_attention(q, k, v, tables, lens, 0.125, max_len)
    assert stats["launches"] == before
    monkeypatch.setenv("ZKV_KERNELS", "metal")
    got = paged_attention(q, k, v, tables, lens, 0.125, max_len)
    assert stats["launches"] > before
    np.testing.assert_allclose(np.array(got), np.array(want), atol=4e-3)
    ref = paged_attention_reference(q, k, v, tables, lens, 0.125, max_len)
    np.testing.assert_array_equal(np.array(want), np.array(ref))


def test_metal_path_quantized_pools(sim, monkeypatch):
    q, k, v, tables, lens, max_len = random_case(2)
    kq, vq = quantize_pool(k, 4, 32), quantize_pool(v, 8, 64)
    monkeypatch.setenv("ZKV_KERNELS", "metal")
    got = paged_attention(q, kq, vq, tables, lens, 0.125, max_len)
    want = paged_attention_reference_quantized(q, kq, vq, tables, lens, 0.125, max_len)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=6e-3)


def channel_case(seed, dtype=mx.float16, sinks=4, bs=32, d=64, n_kv=2, n_heads=6, lens=(3, 31, 32, 33, 170)):
    """q, a ChannelKeyPool and V pool written through a KVPool (sinks, tail slabs), tables, lens, max_len."""
    rng = np.random.default_rng(seed)
    need = [-(-n // bs) for n in lens]
    nb = sum(need) + 3
    ids = [int(i) for i in rng.permutation(nb)]
    pool = KVPool(1, nb, n_kv, bs, d, dtype, QuantSpec(4, 4, 64, True, sinks))
    mx.random.seed(seed)
    tables, start = [], 0
    for n, k in zip(lens, need):
        table = ids[start:start + k]
        start += k
        tables.append(table + [table[0]] * (max(need) - k))
        for a, b in ((0, n - 1), (n - 1, n)):  # prefill, then one decode row
            pos = list(range(a, b))
            if pos:
                plan = pool.plan_write([table[p // bs] for p in pos], [p % bs for p in pos], pos)
                pool.write(0, mx.random.normal((b - a, n_kv, d)), mx.random.normal((b - a, n_kv, d)), plan)
    q = mx.random.normal((len(lens), n_heads, 1, d)).astype(dtype)
    return (q, pool.k_pool(0), pool.v_pool(0), mx.array(tables, dtype=mx.int32), mx.array(lens, dtype=mx.int32),
            max(lens))


@pytest.mark.parametrize("fmt", ["float", "q4k_q8v", "channel"])
def test_return_mass_on_both_paths(fmt, sim, monkeypatch):
    if fmt == "channel":
        q, k, v, tables, lens, max_len = channel_case(3)
    else:
        q, k, v, tables, lens, max_len = random_case(3)
        if fmt != "float":
            k, v = quantize_pool(k, 4, 64), quantize_pool(v, 8, 32)
    monkeypatch.setenv("ZKV_KERNELS", "reference")
    plain = paged_attention(q, k, v, tables, lens, 0.125, max_len)
    want, want_mass = paged_attention(q, k, v, tables, lens, 0.125, max_len, return_mass=True)
    np.testing.assert_array_equal(np.array(want), np.array(plain))  # the flag does not change the output
    assert want_mass.shape == tables.shape and want_mass.dtype == mx.float32
    np.testing.assert_allclose(np.array(want_mass).sum(axis=1), q.shape[1], rtol=1e-5)
    monkeypatch.setenv("ZKV_KERNELS", "metal")
    before = stats["launches"]
    got, got_mass = paged_attention(q, k, v, tables, lens, 0.125, max_len, return_mass=True)
    assert stats["launches"] >= before + 2  # attention, then the mass normalisation
    np.testing.assert_allclose(np.array(got), np.array(want), atol=6e-3)
    np.testing.assert_allclose(np.array(got_mass), np.array(want_mass), rtol=1e-3, atol=1e-4)
    plain_metal = paged_attention(q, k, v, tables, lens, 0.125, max_len)
    np.testing.assert_allclose(np.array(plain_metal), np.array(got), atol=2e-3)


def test_reference_mass_flag():
    q, k, v, tables, lens, max_len = random_case(4, dtype=mx.float32)
    out = paged_attention_reference(q, k, v, tables, lens, 0.125, max_len)
    out2, mass = paged_attention_reference(q, k, v, tables, lens, 0.125, max_len, return_mass=True)
    np.testing.assert_array_equal(np.array(out2), np.array(out))
    # by hand: softmax per head over the valid positions, summed per block and over heads
    B, nb = tables.shape
    bs = k.shape[2]
    rep = q.shape[1] // k.shape[1]
    kk = np.array(k)[np.array(tables)].transpose(0, 2, 1, 3, 4).reshape(B, k.shape[1], nb * bs, -1)
    want = np.zeros((B, nb))
    for b in range(B):
        n = int(lens[b].item())
        for h in range(q.shape[1]):
            s = kk[b, h // rep, :n] @ np.array(q)[b, h, 0] * 0.125
            p = np.exp(s - s.max())
            p /= p.sum()
            want[b] += np.bincount(np.arange(n) // bs, weights=p, minlength=nb)
    np.testing.assert_allclose(np.array(mass), want, rtol=1e-5, atol=1e-6)
    qo, qm = paged_attention_reference_quantized(q, k, v, tables, lens, 0.125, max_len, return_mass=True)
    np.testing.assert_array_equal(np.array(qo), np.array(out))
    np.testing.assert_allclose(np.array(qm), np.array(mass), rtol=1e-6, atol=1e-7)


def test_channel_keys_metal_equals_reference(sim, monkeypatch):
    for seed, sinks in ((5, 4), (6, 0)):
        q, k, v, tables, lens, max_len = channel_case(seed, sinks=sinks)
        assert isinstance(k, ChannelKeyPool)
        want = paged_attention_reference_quantized(q, k, v, tables, lens, 0.125, max_len)
        monkeypatch.setenv("ZKV_KERNELS", "metal")
        for two_pass in (False, True):
            got = metal.paged_attention_metal(q, k, v, tables, lens, 0.125, max_len, two_pass=two_pass)
            np.testing.assert_allclose(np.array(got), np.array(want), atol=6e-3)


def test_forced_metal_without_a_kernel_is_an_error(sim, monkeypatch):
    q, k, v, tables, lens, max_len = random_case(0, d=72)
    monkeypatch.setenv("ZKV_KERNELS", "metal")
    with pytest.raises(KernelError, match="head_dim 72"):
        paged_attention(q, k, v, tables, lens, 0.125, max_len)


def test_auto_falls_back_with_one_warning(monkeypatch):
    def broken_factory(**kw):
        raise RuntimeError("program_source:12:3: error: use of undeclared identifier")

    monkeypatch.setattr(mx.fast, "metal_kernel", broken_factory)
    monkeypatch.setattr(dispatch, "metal_available", lambda: True)
    monkeypatch.setenv("ZKV_KERNELS", "auto")
    registry.clear()
    dispatch.reset()
    q, k, v, tables, lens, max_len = random_case(0)
    want = paged_attention_reference(q, k, v, tables, lens, 0.125, max_len)
    with pytest.warns(RuntimeWarning, match="using the reference"):
        got = paged_attention(q, k, v, tables, lens, 0.125, max_len)
    np.testing.assert_array_equal(np.array(got), np.array(want))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        paged_attention(q, k, v, tables, lens, 0.125, max_len)
    monkeypatch.setenv("ZKV_KERNELS", "metal")
    dispatch.reset()
    with pytest.raises(KernelError, match="undeclared identifier"):
        paged_attention(q, k, v, tables, lens, 0.125, max_len)
    # the mass variants fall back the same way, to the reference with the mass
    monkeypatch.setenv("ZKV_KERNELS", "auto")
    dispatch.reset()
    want = paged_attention_reference_quantized(q, k, v, tables, lens, 0.125, max_len, return_mass=True)
    with pytest.warns(RuntimeWarning, match="paged_attention_1pass_mass_f16"):
        got = paged_attention(q, k, v, tables, lens, 0.125, max_len, return_mass=True)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    registry.clear()
    dispatch.reset()


def test_sources_ship_as_package_resources():
    body, header = registry.kernel_source("paged_attention_1pass")
    assert "zkv_attend" in body and "zkv_load_chunk" in header
    assert set(registry.kernel_bodies("paged_attention.metal")) == set(registry.KERNELS)


@pytest.mark.slow
def test_greedy_generation_on_bundled_model_matches_reference(sim, monkeypatch):
    from zkv_mlx import paths
    from zkv_mlx.config import make_config
    from zkv_mlx.engine import Engine, SamplingParams
    from zkv_mlx.models.loader import load_model

    spec = str(paths.default_model_path())
    cfg = make_config(model=spec, kv_cache_memory="8MB", block_size=16)
    lm = load_model(spec, cfg.weights_dtype)
    prompts = [lm.tokenizer.encode("The capital of France is"),
               lm.tokenizer.encode("Paged attention keeps keys and values in blocks, so")]

    def generate(choice):
        monkeypatch.setenv("ZKV_KERNELS", choice)
        engine = Engine(lm, cfg)
        seqs = [engine.add_request(ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), "local",
                                   lambda ev: None) for ids in prompts]
        while engine.has_work():
            engine.step()
        return [s.output_ids for s in seqs]

    want = generate("reference")
    before = stats["launches"]
    assert generate("metal") == want
    assert stats["launches"] - before >= 11 * lm.n_layers  # every decode step ran the kernels


@pytest.fixture(scope="module")
def tiny_d64(bundled_tokenizer, tmp_path_factory):
    """A tiny random qwen3 with head_dim 64 (the kernels' smallest): its path and the loaded model."""
    from conftest import TINY, write_tiny_model
    from zkv_mlx.models.loader import load_model

    TINY.setdefault("qwen3-d64", dict(TINY["qwen3"], head_dim=64))
    path = str(write_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-d64"), "qwen3-d64", bundled_tokenizer))
    return path, load_model(path, "float32")


def _greedy(monkeypatch, choice, lm, cfg, prompts, n):
    from zkv_mlx.engine import Engine, SamplingParams

    monkeypatch.setenv("ZKV_KERNELS", choice)
    engine = Engine(lm, cfg)
    seqs = [engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), "local",
                               lambda ev: None) for ids in prompts]
    while engine.has_work():
        engine.step()
    return engine, [s.output_ids for s in seqs]


def test_greedy_generation_with_channel_keys_matches_reference(sim, monkeypatch, tiny_d64):
    # The default int4 KV format (keys per channel over 32-token blocks, tail block and 4 sinks in full
    # precision, values g64): sequences cross the sinks, tail blocks fill and are quantized while decoding.
    from zkv_mlx.config import make_config

    path, lm = tiny_d64
    cfg = make_config(model=path, kv_cache_memory="16MB", kv_quant="int4", prompt_cache=False)
    assert (cfg.kv.channel_keys, cfg.kv.block_size, cfg.kv.sinks) == (True, 32, 4)
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(10, 4000, n)] for n in (3, 20, 45)]
    engine, want = _greedy(monkeypatch, "reference", lm, cfg, prompts, 30)
    assert engine.runner.pool.quant.k_channel
    before = stats["launches"]
    assert _greedy(monkeypatch, "metal", lm, cfg, prompts, 30)[1] == want
    assert stats["launches"] - before >= 29 * lm.n_layers  # every decode step ran the kernels


def test_h2o_on_the_metal_path_matches_reference(sim, monkeypatch, tiny_d64):
    # H2O ranks blocks by the attention mass: on the Metal path it comes from the mass kernels.
    from zkv_mlx.config import make_config

    path, lm = tiny_d64
    cfg = make_config(model=path, block_size=8, kv_dtype="float32", kv_cache_memory="8MB", kv_policy="h2o",
                      budget=64, sinks=4, h2o_recent=16, prompt_cache=False)
    prompt = list(range(300, 400))
    ref_engine, want = _greedy(monkeypatch, "reference", lm, cfg, [prompt], 40)
    before = stats["launches"]
    engine, got = _greedy(monkeypatch, "metal", lm, cfg, [prompt], 40)
    assert got == want
    assert engine.policy_dropped_blocks == ref_engine.policy_dropped_blocks > 0
    assert stats["launches"] - before >= 2 * 39 * lm.n_layers  # attention + mass normalisation per layer
