"""Quantized KV: round-trip bounds, pool writes in any chunking == one write, engine hit == fresh prefill."""

import mlx.core as mx
import numpy as np
import pytest

from zkv_mlx.config import KVCacheConfig, make_config
from zkv_mlx.engine import Engine, SamplingParams
from zkv_mlx.errors import ConfigError
from zkv_mlx.kernels.kv_quant import (QuantSpec, dequantize_channels, dequantize_tokens, pack, quantize_channels,
                                      quantize_tokens, unpack)
from zkv_mlx.models.loader import load_model
from zkv_mlx.storage.kv_pool import KVPool

H, D = 2, 64


def _spec(quant, **kw):
    return QuantSpec.from_config(KVCacheConfig(quant=quant, **kw))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64])
def test_token_round_trip_within_half_a_step(bits, group):
    x = mx.random.normal((5, H, 16, D), key=mx.random.key(bits + group)) * 3
    p, s, b = quantize_tokens(x, bits, group)
    y = dequantize_tokens(p, s, b, bits, group)
    assert p.shape == (5, H, 16, D * bits // 32) and s.shape == (5, H, 16, D // group)
    step = mx.repeat(s.astype(mx.float32), group, axis=-1)
    # half a quantization step, plus float16 rounding of the inputs
    assert mx.all(mx.abs(y - x) <= step / 2 + 2e-3 * (1 + mx.abs(x))).item()
    # the layout is mx.quantize's: mx.dequantize (and the Metal kernels) read it
    f32 = mx.float32
    assert mx.allclose(mx.dequantize(p, s.astype(f32), b.astype(f32), group_size=group, bits=bits), y,
                       atol=1e-5).item()


@pytest.mark.parametrize("bits", [4, 8])
def test_channel_round_trip_within_half_a_step(bits):
    x = mx.random.normal((3, H, 32, D), key=mx.random.key(bits)) * mx.linspace(0.1, 10, D)  # channel scales vary
    p, s, b = quantize_channels(x, bits)
    assert p.shape == (3, H, 32, D * bits // 32) and s.shape == (3, H, 1, D)
    y = dequantize_channels(p, s, b, bits)
    step = s.astype(mx.float32)
    assert mx.all(mx.abs(y - x) <= step / 2 + 1e-3 * (1 + mx.abs(x))).item()
    # the extremes of each channel survive (up to the float16 bias)
    assert mx.allclose(y.min(axis=-2), x.min(axis=-2), rtol=1e-3, atol=1e-3).item()


def test_pack_uses_mx_quantize_bit_order():
    x = mx.random.normal((4, 64))
    for bits in (4, 8):
        p, s, b = mx.quantize(x, group_size=32, bits=bits)
        q = unpack(p, bits)
        assert mx.array_equal(pack(q, bits), p).item()
        assert mx.allclose(q.astype(mx.float32) * mx.repeat(s, 32, -1) + mx.repeat(b, 32, -1),
                           mx.dequantize(p, s, b, group_size=32, bits=bits)).item()


def test_config_names_bad_values():
    with pytest.raises(ConfigError, match="'int3'"):
        KVCacheConfig(quant="int3")
    with pytest.raises(ConfigError, match="48"):
        make_config(kv_quant="int4", kv_group_size=48)
    cfg = make_config(kv_quant="int4", kv_group_size=32)
    assert (cfg.kv.quant, cfg.kv.group_size, cfg.kv.block_size, cfg.kv.channel_keys) == ("int4", 32, 32, True)
    assert make_config(kv_quant="int8").kv.block_size == 16


@pytest.mark.parametrize("quant", ["int8", "int4", "int4-f16", "k8v4"])
def test_bytes_per_block_counts_scales(quant):
    kv = KVCacheConfig(quant=quant)
    spec = QuantSpec.from_config(kv)
    pool = KVPool(2, 3, H, kv.block_size, D, mx.float32, spec)
    stored = sum(a.nbytes for layer in pool.k + pool.v for a in layer)
    assert stored == KVPool.bytes_per_block(2, H, kv.block_size, D, mx.float32, spec) * 3
    fp16 = KVPool.bytes_per_block(2, H, kv.block_size, D, mx.float16)
    ratio = stored / 3 / fp16
    assert ratio <= {"int8": 0.57, "int4": 0.30, "int4-f16": 0.30, "k8v4": 0.41}[quant]  # int8: groups of 32 (DEFAULT_GROUP)
    assert spec.name(kv.block_size) in pool.format_name


def _write_chunks(pool, rows_k, rows_v, table, cuts):
    bs = pool.block_size
    for a, b in zip(cuts, cuts[1:]):
        plan = pool.plan_write([table[p // bs] for p in range(a, b)], [p % bs for p in range(a, b)], list(range(a, b)))
        pool.write(0, rows_k[a:b], rows_v[a:b], plan)
    mx.eval(pool.k, pool.v, pool.tail_k)


@pytest.mark.parametrize("quant", ["int4", "int4-f16", "int8"])
def test_chunked_writes_equal_one_write(quant):
    spec = _spec(quant)
    bs, n = 32, 75
    k = mx.random.normal((n, H, D), key=mx.random.key(1))
    v = mx.random.normal((n, H, D), key=mx.random.key(2))
    table = [5, 2, 7]
    one = KVPool(1, 8, H, bs, D, mx.float32, spec)
    _write_chunks(one, k, v, table, [0, n])
    many = KVPool(1, 8, H, bs, D, mx.float32, spec)
    _write_chunks(many, k, v, table, [0, 5, 40, 63, 64] + list(range(65, n + 1)))  # prefill chunks, then decode
    for length in (1, 31, 32, 33, 64, 75):
        ka, va = one.gather(0, table, length)
        kb, vb = many.gather(0, table, length)
        assert mx.array_equal(ka, kb).item() and mx.array_equal(va, vb).item()
    ka, va = one.gather(0, table, n)
    kt = k.transpose(1, 0, 2)[None]
    assert ka.shape == (1, H, n, D)
    if spec.k_channel:  # the partial tail block is kept exactly
        assert mx.array_equal(ka[:, :, 64:], kt[:, :, 64:]).item()
        assert one.tail_blocks() == [7]
    assert mx.abs(ka - kt).max().item() < (0.6 if spec.k_bits == 4 else 0.04)
    assert mx.abs(va - v.transpose(1, 0, 2)[None]).max().item() < (0.6 if spec.v_bits == 4 else 0.04)
    # full blocks export/import byte-exactly into another pool of the same format
    ks, vs = one.export_blocks([5, 2])
    other = KVPool(1, 8, H, bs, D, mx.float32, spec)
    other.import_blocks([0, 1], ks, vs)
    kc, vc = other.gather(0, [0, 1], 64)
    assert mx.array_equal(kc, ka[:, :, :64]).item() and mx.array_equal(vc, va[:, :, :64]).item()


def test_sink_keys_are_kept_and_travel_with_their_block():
    spec = _spec("int4")
    assert spec.sinks == 4
    k = mx.random.normal((40, H, D), key=mx.random.key(3))
    k = mx.concatenate([k[:1] * 50, k[1:]])  # an outlier first key, as attention sinks have
    v = mx.random.normal((40, H, D), key=mx.random.key(4))
    pool = KVPool(1, 4, H, 32, D, mx.float32, spec)
    _write_chunks(pool, k, v, [3, 1], [0, 3, 40])
    kg, _ = pool.gather(0, [3, 1], 40)
    kt = k.transpose(1, 0, 2)[None]
    assert mx.array_equal(kg[:, :, :4], kt[:, :, :4]).item()
    # the outlier does not widen block 0's ranges: the other rows keep 4-bit accuracy of ordinary keys
    assert mx.abs(kg[:, :, 4:32] - kt[:, :, 4:32]).max().item() < 0.6
    ks, vs = pool.export_blocks([3])
    other = KVPool(1, 4, H, 32, D, mx.float32, spec)
    other.import_blocks([2], ks, vs)
    assert mx.array_equal(other.gather(0, [2], 32)[0], kg[:, :, :32]).item()
    # block 3 reused for later positions: its sink keys are dropped
    pool.plan_write([3], [0], [64])
    assert 3 not in pool._sink_slot


def test_tail_slots_are_reused():
    pool = KVPool(1, 8, H, 32, D, mx.float32, _spec("int4"))
    for b in range(6):  # six partial blocks at once: the slab grows
        pool.plan_write([b], [0])
    assert len(pool.tail_blocks()) == 6
    n_slots = pool.tail_k[0].shape[0]
    for b in range(6):
        pool.drop_tail(b)
    for b in range(6):
        pool.plan_write([b], [0])
    assert pool.tail_k[0].shape[0] == n_slots


# -- through the engine -----------------------------------------------------------------------------------

@pytest.fixture
def quant_engine(tiny_model_dir):
    def make(quant, **kw):
        cfg = make_config(model=str(tiny_model_dir("llama")), kv_cache_memory="16MB", kv_quant=quant, **kw)
        return Engine(load_model(cfg.model, cfg.weights_dtype), cfg)

    return make


def _greedy(engine, prompts, n):
    seqs = [engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), "local",
                               lambda ev: None) for ids in prompts]
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs], [s.num_cached_tokens for s in seqs]


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_prefix_hit_equals_fresh_prefill(quant, quant_engine):
    rng = np.random.default_rng(0)
    prefix = [int(t) for t in rng.integers(10, 400, 70)]  # two full 32-token blocks + a partial one
    prompt = prefix + [int(t) for t in rng.integers(10, 400, 9)]
    warm = quant_engine(quant, prefill_chunk=16)
    assert warm.runner.pool.quant is not None
    _greedy(warm, [prefix], 4)
    (hit,), (cached,) = _greedy(warm, [prompt], 12)
    assert cached >= 64
    fresh = quant_engine(quant, prefill_chunk=16, prompt_cache=False)
    (miss,), _ = _greedy(fresh, [prompt], 12)
    assert hit == miss
    # batched decode of several sequences with tails in different blocks gives the solo tokens
    batched, _ = _greedy(fresh, [prompt, prompt[:40], prompt[:33]], 12)
    assert batched[0] == miss
    assert len(fresh.runner.pool.tail_blocks()) <= 3


def test_eval_ppl_json_line(tiny_model_dir, capsys):
    import json
    import types

    from zkv_mlx.eval.ppl import run

    args = types.SimpleNamespace(kv_quant="int4", kv_group_size=None, block_size=None, kv_key_layout="auto",
                                 kv_sinks=4, text=None, model=str(tiny_model_dir("llama")), weights_dtype=None,
                                 context=80, windows=2, chunk=24, vs_mlx_lm=False, json=True)
    assert run(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"format", "ppl_ref", "ppl", "delta_pct", "kl_mean", "tokens"} <= set(out)
    assert out["tokens"] == 2 * 79 and out["kl_mean"] >= 0 and "sinks=4" in out["kv_format"]


def test_eval_ppl_policy_on_a_quantized_cache_reports_the_float_policy_beside_it(tiny_model_dir, capsys):
    # Issue 19: `eval ppl --kv-quant int4 --kv-policy window --budget N` was refused; it now runs the policy on
    # the quantized cache and the same policy on a float cache (same block size, same windows) in one pass.
    import json
    import types

    from zkv_mlx.eval.ppl import run

    args = types.SimpleNamespace(kv_quant="int4", kv_group_size=None, block_size=None, kv_key_layout="auto",
                                 kv_sinks=4, text=None, model=str(tiny_model_dir("llama")), weights_dtype=None,
                                 context=300, windows=1, chunk=32, vs_mlx_lm=False, json=True, kv_policy="window",
                                 budget=128, sinks=4, h2o_recent=None, compare=False)
    assert run(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["format"] == "window+int4" and out["block_size"] == 32 and out["tokens"] == 299
    flt = out["float_policy"]
    assert flt["ppl_ref"] == out["ppl_ref"] and flt["tokens"] == out["tokens"]
    assert flt["kl_mean"] > 0 and out["ppl"] != flt["ppl"]  # the window drops context; int4 adds its own error
    assert out["vs_float_policy_points"] == pytest.approx(out["delta_pct"] - flt["delta_pct"], abs=2e-3)


def test_kvmem_counts_the_tail_block_and_sinks_per_sequence():
    from zkv_mlx.bench.kvmem import measure

    r = measure(2, 3, 64, "int4")  # float32 tail rows, 4 sinks, 32-token blocks
    assert r["tail_bytes_per_seq"] == 2 * 3 * 32 * 64 * 4 and r["sink_bytes_per_seq"] == 2 * 3 * 4 * 64 * 4
    assert measure(2, 3, 64, "int8")["sink_bytes_per_seq"] == 0


# -- CPU decode straight from the quantized blocks ----------------------------------------------------------------

@pytest.mark.parametrize("quant,kw", [("int4", {}), ("int4", {"sinks": 0}), ("int4-f16", {}), ("int8", {}), ("int8", {"group_size": 32}),
                                      ("k8v4", {}), ("int4", {"key_layout": "token"})])
def test_decode_from_quantized_blocks_equals_dequantized_attention(quant, kw):
    from zkv_mlx.kernels.reference import prefill_attention_reference

    spec = _spec(quant, **kw)
    bs, n, n_heads = 32, 300, 6
    k = mx.random.normal((n, H, D), key=mx.random.key(5))
    k = mx.concatenate([k[:1] * 30, k[1:]])  # a sink-like outlier first key
    v = mx.random.normal((n, H, D), key=mx.random.key(6))
    contiguous = list(range(3, 13))
    scattered = [17, 2, 9, 30, 4, 21, 11, 0, 26, 14]  # more runs than the slicing path takes
    for table in (contiguous, scattered):
        pool = KVPool(1, 32, H, bs, D, mx.float32, spec)
        _write_chunks(pool, k, v, table, [0, 100, 250] + list(range(251, n + 1)))
        assert pool.reads_quantized
        for length in (1, 3, 5, 32, 33, 64, 250, 288, 300):
            q = mx.random.normal((1, n_heads, 1, D), key=mx.random.key(length))
            keys, values = pool.gather(0, table, length)
            want = prefill_attention_reference(q, keys, values, D**-0.5)
            got = pool.decode_attention(0, q, table, length, D**-0.5)
            assert got.shape == want.shape == (1, n_heads, 1, D)
            assert mx.allclose(got, want, atol=2e-5, rtol=1e-4).item(), (quant, kw, table[0], length)


@pytest.mark.parametrize("quant", ["int4", "int4-f16", "k8v4"])
def test_engine_decode_from_quantized_blocks_equals_dequantizing_path(quant, monkeypatch, tiny_model_dir):
    # qwen3 tiny: head_dim 32, a group size mx.quantized_matmul takes, so decode reads the packed blocks
    def run():
        cfg = make_config(model=str(tiny_model_dir("qwen3")), kv_cache_memory="16MB", kv_quant=quant,
                          prefill_chunk=16, prompt_cache=False)
        engine = Engine(load_model(cfg.model, cfg.weights_dtype), cfg)
        rng = np.random.default_rng(1)
        prompts = [[int(t) for t in rng.integers(10, 400, n)] for n in (70, 33, 5)]
        return engine, _greedy(engine, prompts, 40)[0]

    engine, direct = run()
    assert engine.runner.pool.reads_quantized
    monkeypatch.setattr(KVPool, "reads_quantized", property(lambda self: False))
    engine, dequantized = run()
    assert not engine.runner.pool.reads_quantized
    assert direct == dequantized
