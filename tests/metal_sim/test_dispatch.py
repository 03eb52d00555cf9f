"""The dispatcher with the simulator standing in for mx.fast.metal_kernel: ZKV_KERNELS routing, the fallback
with one warning, and the Metal path equal to the reference path (random pools, then a real generation)."""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from zkv_mlx.errors import ConfigError, KernelError
from zkv_mlx.kernels import dispatch, kernel_path, paged_attention, registry
from zkv_mlx.kernels.kv_format import quantize_pool
from zkv_mlx.kernels.reference import paged_attention_reference
from zkv_mlx.kernels.reference_quant import paged_attention_reference_quantized

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
