"""Prefill attention with causal / sliding-window masks and attention sinks (issue 20 item 2).

Checked against `mx.fast.scaled_dot_product_attention` with an explicit [L, kv_len] mask (+ sinks) over query
and key lengths around the tile size, windows, GQA ratios; on both CPU paths (numpy exp tile by tile, and the
lazy MLX graph used for a few queries).
"""

import itertools

import mlx.core as mx
import pytest

from zkv_mlx.kernels import prefill
from zkv_mlx.kernels.prefill import QUERY_TILE, prefill_attention
from zkv_mlx.kernels.prefill_cpu import edges
from zkv_mlx.kernels.reference import prefill_attention_reference

T = QUERY_TILE
SHAPES = [(1, 1), (1, 70), (5, 40), (T, T), (T + 1, T + 1), (T + 1, 300), (2 * T + 44, 2 * T + 44),
          (2 * T + 1, 3 * T + 9)]
HEADS = [(4, 4), (6, 2), (6, 3), (8, 1)]


def _want(q, k, v, scale, window, sinks):
    L, lk = q.shape[2], k.shape[2]
    i = mx.arange(lk - L, lk)[:, None]
    j = mx.arange(lk)[None]
    mask = j <= i
    if window is not None:
        mask = mask & (j > i - window)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks), mask


@pytest.fixture(params=["numpy", "mlx"])
def path(request, monkeypatch):
    monkeypatch.setattr(prefill, "NUMPY_MIN_QUERIES", 1 if request.param == "numpy" else 10**9)
    return request.param


@pytest.mark.parametrize("window", [None, 1, 7, T, T + 1, 1000])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_matches_sdpa_with_explicit_mask(path, window, with_sinks):
    for n, ((L, lk), (hq, hkv)) in enumerate(itertools.product(SHAPES, HEADS)):
        key = mx.random.split(mx.random.key(n), 4)
        q = mx.random.normal((1, hq, L, 16), key=key[0])
        k = mx.random.normal((1, hkv, lk, 16), key=key[1])
        v = mx.random.normal((1, hkv, lk, 16), key=key[2])
        sinks = mx.random.normal((hq,), key=key[3]) * 2 if with_sinks else None
        got = prefill_attention(q, k, v, 0.25, window=window, sinks=sinks)
        want, _ = _want(q, k, v, 0.25, window, sinks)
        assert got.shape == want.shape and got.dtype == mx.float32
        assert not mx.isnan(got).any().item()
        err = mx.abs(got - want).max().item()
        assert err < 2e-5, (path, L, lk, hq, hkv, window, with_sinks, err)


@pytest.mark.parametrize("window", [None, 9, 200])
def test_mass_is_the_probabilities_summed_per_key(path, window):
    L, lk, hq, hkv = 2 * T + 3, 2 * T + 40, 6, 2
    q = mx.random.normal((1, hq, L, 16), key=mx.random.key(1))
    k = mx.random.normal((1, hkv, lk, 16), key=mx.random.key(2))
    v = mx.random.normal((1, hkv, lk, 16), key=mx.random.key(3))
    mass: list = []
    prefill_attention(q, k, v, 0.25, mass, window=window)
    _, mask = _want(q, k, v, 0.25, window, None)
    kr = mx.repeat(k, hq // hkv, axis=1)
    s = mx.where(mask, (q * 0.25) @ kr.swapaxes(-1, -2), -float("inf"))
    want = mx.softmax(s, axis=-1).sum(axis=(0, 1, 2))
    assert mass[0].shape == (lk,)
    assert mx.allclose(mass[0], want, atol=1e-4, rtol=1e-5).item()
    assert abs(mass[0].sum().item() - hq * L) < 1e-2  # every query row's probabilities sum to one


def test_half_precision_and_reference_name():
    q = mx.random.normal((1, 4, 40, 16)).astype(mx.float16)
    k = mx.random.normal((1, 2, 90, 16)).astype(mx.float16)
    v = mx.random.normal((1, 2, 90, 16)).astype(mx.float16)
    got = prefill_attention_reference(q, k, v, 0.25, window=30)
    want, _ = _want(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), 0.25, 30, None)
    assert got.dtype == mx.float16
    assert mx.allclose(got.astype(mx.float32), want, atol=3e-3).item()


def test_only_edge_tiles_are_masked():
    # a long full-attention chunk: only the causal triangle of each tile, never the visible prefix
    assert edges(a=4000, t=T, lo=0, span=4000 + T, window=None) == [(4000, 4000 + T)]
    # a window far behind the tile: the band at its start and the triangle at its end
    w = 1024
    lo = 4000 - w + 1
    assert edges(a=4000, t=T, lo=lo, span=4000 + T - lo, window=w) == [(0, T - 1), (w - 1, w - 1 + T)]
    assert edges(a=10, t=1, lo=0, span=11, window=None) == []


@pytest.mark.parametrize("bad,match", [(dict(window=0), "window=0"), (dict(window=2.5), "window=2.5"),
                                       (dict(sinks=mx.zeros((3,))), r"\(3,\)")])
def test_bad_arguments_are_named(bad, match):
    q, k = mx.zeros((1, 4, 8, 16)), mx.zeros((1, 2, 8, 16))
    with pytest.raises(ValueError, match=match):
        prefill_attention(q, k, k, 0.25, **bad)
    with pytest.raises(ValueError, match="queries over"):
        prefill_attention(mx.zeros((1, 4, 9, 16)), k, k, 0.25)


@pytest.mark.parametrize("window", [None, 5, 150])
def test_metal_path_per_tile_masks_match(window):
    # the Metal path (MLX's fused kernel, per tile under a window) runs on the CPU too: same results
    L, lk = 2 * T + 7, 3 * T
    q = mx.random.normal((1, 6, L, 16), key=mx.random.key(7))
    k = mx.random.normal((1, 2, lk, 16), key=mx.random.key(8))
    v = mx.random.normal((1, 2, lk, 16), key=mx.random.key(9))
    sinks = mx.random.normal((6,), key=mx.random.key(10))
    got = prefill._fused(q, k, v, 0.25, window, sinks)
    want, _ = _want(q, k, v, 0.25, window, sinks)
    assert mx.abs(got - want).max().item() < 2e-5
