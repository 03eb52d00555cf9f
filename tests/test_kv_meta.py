"""Issue #19's int4 format: keys per channel with 8-bit metadata (e4m3 scale rounded up + zero point), values g32.

The quantizer must be the one docs/experiments/kv_candidates.py measured ("c32 u8 / v g32 f16"), bit for bit.
"""

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from zkv_mlx.config import KVCacheConfig
from zkv_mlx.kernels.kv_meta import E4M3_MAX, decode_e4m3, encode_e4m3, meta_to_float, round_up_e4m3
from zkv_mlx.kernels.kv_quant import QuantSpec, dequantize_channels, quantize_channels
from zkv_mlx.storage.kv_pool import KVPool

H, D = 2, 64
ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def _candidates():
    spec = importlib.util.spec_from_file_location("kv_candidates", ROOT / "docs/experiments/kv_candidates.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kv_candidates"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _e4m3_values() -> np.ndarray:
    # every positive e4m3 value, from the definition: subnormals m * 2^-9, normals 2^(e-7) * (1 + m/8)
    vals = [m * 2.0 ** -9 for m in range(1, 8)]
    vals += [2.0 ** (e - 7) * (1 + m / 8) for e in range(1, 16) for m in range(8)]
    return np.array(vals, np.float32)


def test_e4m3_codes_round_trip_every_value():
    vals = _e4m3_values()
    codes = encode_e4m3(mx.array(vals))
    assert np.array_equal(np.array(codes), np.arange(1, 128, dtype=np.uint8))
    assert np.array_equal(np.array(decode_e4m3(codes)), vals)
    assert vals[-1] == E4M3_MAX


def test_scale_rounds_up_to_the_smallest_e4m3_value_not_below_it():
    vals = _e4m3_values()
    x = mx.random.uniform(1e-6, 400.0, (4000,), key=mx.random.key(0)) ** 1.0
    x = mx.concatenate([x, mx.random.uniform(1e-6, 0.05, (4000,), key=mx.random.key(1)), mx.array(vals)])
    s = np.array(round_up_e4m3(x))
    xs = np.array(x)
    assert np.all(s >= xs)  # rounded up: the range stays covered
    assert np.all(np.isin(s, vals))
    below = vals[np.maximum(np.searchsorted(vals, s) - 1, 0)]  # the next smaller e4m3 value
    assert np.all((below < xs) | (s == vals[0]))
    # the experiment's own rounding, on the same inputs
    assert np.array_equal(s, np.array(_candidates()._round_meta(x, "u8")))


@pytest.mark.parametrize("bits", [4, 8])
def test_channel_quantizer_is_the_measured_one_bit_for_bit(bits):
    x = mx.random.normal((3, H, 32, D), key=mx.random.key(bits)) * mx.linspace(0.05, 8, D) + mx.linspace(-3, 3, D)
    p, s, z = quantize_channels(x, bits, "e4m3")
    assert p.shape == (3, H, 32, D * bits // 32) and s.shape == z.shape == (3, H, 1, D)
    assert s.dtype == z.dtype == mx.uint8
    y = dequantize_channels(p, s, z, bits)
    want = _candidates().affine(x, 2, bits, "u8")
    assert mx.array_equal(y, want).item()


def test_channel_round_trip_within_half_a_step_and_no_clipping():
    x = mx.random.normal((4, H, 32, D), key=mx.random.key(7)) * mx.linspace(0.3, 20, D)
    # offsets within the zero point's reach (|lo| <= 128 steps; beyond it z clips, as in the measured quantizer)
    x = x + mx.linspace(-2, 2, D)
    p, s, z = quantize_channels(x, 4, "e4m3")
    scale, bias = meta_to_float(s, z)
    y = dequantize_channels(p, s, z, 4)
    assert mx.all(mx.abs(y - x) <= scale / 2 + 1e-6).item()  # half a step: neither end of a range is clipped
    lo, hi = x.min(axis=-2, keepdims=True), x.max(axis=-2, keepdims=True)
    assert mx.all(scale * 15 >= hi - lo).item()
    assert mx.all(scale <= (hi - lo) / 15 * 1.125 + 2.0 ** -9).item()  # e4m3 has 3 mantissa bits
    # the stored zero point is an integer in [-128, 127] and the bias is exactly -scale * zero point
    zp = z.astype(mx.int32) - 128
    assert mx.array_equal(bias, -zp.astype(mx.float32) * scale).item()
    assert mx.all(mx.abs(zp) < 128).item()


def test_zero_point_clips_like_the_measured_quantizer():
    # channels far from 0 relative to their spread: z = round(-lo / s) would be ~500 and clips to 127
    # (kernels/kv_meta.py, Limits)
    x = -2.0 + 0.06 * mx.random.uniform(shape=(1, 1, 32, 32), key=mx.random.key(8))
    p, s, z = quantize_channels(x, 4, "e4m3")
    assert mx.all(z.astype(mx.int32) - 128 == 127).item()
    assert mx.array_equal(dequantize_channels(p, s, z, 4), _candidates().affine(x, 2, 4, "u8")).item()


def test_int4_default_is_the_chosen_format_and_the_old_one_keeps_its_name():
    new = QuantSpec.from_config(KVCacheConfig(quant="int4"))
    old = QuantSpec.from_config(KVCacheConfig(quant="int4-f16"))
    assert (new.k_bits, new.v_bits, new.group_size, new.k_channel, new.sinks, new.k_meta) == (4, 4, 32, True, 4, "e4m3")
    assert (old.group_size, old.k_meta) == (64, "f16")
    assert new.name(32) == "k=q4c32e4m3;v=q4g32;sinks=4"
    assert old.name(32) == "k=q4c32;v=q4g64;sinks=4"  # the name int4 files carried before issue #19
    # 9.5 bits per element (K 4 + 16/32, V 4 + 32/32): 0.297x fp16
    pool = KVPool(2, 3, H, 32, D, mx.float32, new)
    stored = sum(a.nbytes for layer in pool.k + pool.v for a in layer)
    assert stored == KVPool.bytes_per_block(2, H, 32, D, mx.float32, new) * 3
    assert stored / 3 / KVPool.bytes_per_block(2, H, 32, D, mx.float16) == pytest.approx(9.5 / 32)
    assert pool.k[0][1].dtype == pool.k[0][2].dtype == mx.uint8
