"""Re-rotating stored keys of quantized blocks (issue 19: long-context policies on quantized caches)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from zkv_mlx.kernels.kv_quant import QuantSpec
from zkv_mlx.storage.key_shift import shift_block_keys
from zkv_mlx.storage.kv_pool import KVPool

H, D, BS, N, DELTA = 2, 32, 8, 28, 8  # 3 full blocks and a partial one of 4 rows
ROPE = nn.RoPE(D, base=10000.0)
SPECS = {"int4-channel": QuantSpec(4, 4, 32, True, sinks=4), "int8-token": QuantSpec(8, 8, 32, False),
         "float": None}


def _rotate(layer: int, k: mx.array) -> mx.array:
    n, h, bs, d = k.shape
    return ROPE(k.reshape(n * h * bs, 1, d), offset=DELTA).reshape(n, h, bs, d)


def _pool(spec) -> tuple[KVPool, mx.array]:
    pool = KVPool(1, 8, H, BS, D, mx.float32, spec)
    keys = mx.random.normal((N, H, D), key=mx.random.key(1)) * 2.0
    plan = pool.plan_write([p // BS for p in range(N)], [p % BS for p in range(N)], list(range(N)))
    pool.write(0, keys, keys, plan)
    return pool, keys


@pytest.mark.parametrize("name", list(SPECS))
def test_shifted_keys_are_the_rotated_keys_requantized(name):
    pool, _ = _pool(SPECS[name])
    before = np.array(pool.gather(0, [0, 1, 2, 3], N)[0][0])  # [H, N, D] as stored (dequantized)
    shift_block_keys(pool, [0, 1, 3], _rotate)  # block 2 stays; 3 is the partial block (tail slab)
    after = np.array(pool.gather(0, [0, 1, 2, 3], N)[0][0])
    want = before.copy()
    rows = np.r_[0:16, 24:28]
    want[:, rows] = np.array(_rotate(0, mx.array(before[:, rows])[None].transpose(0, 1, 2, 3)))[0]
    np.testing.assert_array_equal(after[:, 16:24], before[:, 16:24])  # not shifted: untouched
    if name == "float":
        np.testing.assert_allclose(after, want, atol=1e-5)
        return
    exact = np.r_[0:4, 24:28] if name == "int4-channel" else np.r_[0:0]  # sink rows and tail rows: float
    np.testing.assert_allclose(after[:, exact], want[:, exact], atol=1e-5)
    # re-quantized rows: within half a step of the new ranges (float16 scales add a little)
    for b in (0, 1):
        w, a = want[:, b * BS:(b + 1) * BS], after[:, b * BS:(b + 1) * BS]
        if name == "int4-channel":
            w, a = (w[:, 4:], a[:, 4:]) if b == 0 else (w, a)
            step = (w.max(axis=1, keepdims=True) - w.min(axis=1, keepdims=True)) / 15
        else:
            step = (w.max(axis=2, keepdims=True) - w.min(axis=2, keepdims=True)) / 255
        assert (np.abs(a - w) <= 0.5 * step * 1.02 + 2e-3).all()
    # and far from the unrotated keys: the shift happened
    assert np.abs(after[:, 4:16] - before[:, 4:16]).mean() > 0.1


def test_a_private_copy_of_a_block_keeps_its_sink_and_tail_rows():
    pool, _ = _pool(SPECS["int4-channel"])
    ref_k, ref_v = pool.gather(0, [0, 1, 2, 3], N)
    for src, dst in ((0, 5), (3, 6)):
        for arrs in (pool.k[0], pool.v[0]):
            for a in arrs:
                a[dst] = a[src]
        pool.copy_slots(src, dst)
    k, v = pool.gather(0, [5, 1, 2, 6], N)
    np.testing.assert_array_equal(np.array(k), np.array(ref_k))
    np.testing.assert_array_equal(np.array(v), np.array(ref_v))
    pool.drop_tail(3)  # the original's slots are its own
    np.testing.assert_array_equal(np.array(pool.gather(0, [5, 1, 2, 6], N)[0]), np.array(ref_k))


def test_a_sink_block_moved_many_times_is_one_requantization_of_its_rotated_keys():
    # The window policy moves its sink block at every drop: its keys must not collect a rounding per move.
    pool, _ = _pool(SPECS["int4-channel"])
    before = np.array(pool.gather(0, [0, 1, 2, 3], N)[0][0])  # [H, N, D] as stored (dequantized)
    moves = 40
    for _ in range(moves):
        shift_block_keys(pool, [0, 1], _rotate)  # block 0 holds the sinks (a policy's sink block); 1 does not
    after = np.array(pool.gather(0, [0, 1, 2, 3], N)[0][0])
    x = mx.array(before[:, :16]).reshape(H * 16, 1, D)
    want = np.array(ROPE(x, offset=moves * DELTA).reshape(H, 16, D))
    err = np.abs(after[:, :16] - want)
    np.testing.assert_allclose(after[:, :4], want[:, :4], atol=1e-4)  # sink rows: float rotations only
    w = want[:, 4:8]
    step = (w.max(axis=1, keepdims=True) - w.min(axis=1, keepdims=True)) / 15
    assert (err[:, 4:8] <= 0.5 * step * 1.02 + 2e-3).all()  # one rounding of the rotated keys
    # a block without a master (not a sink block) drifts: the master is what keeps block 0 exact
    assert err[:, 8:16].mean() > 3 * err[:, 4:8].mean()
    # the master goes with the block's sink slot: block 0 reused by another sequence starts from its new keys
    assert 0 in pool._key_master
    fresh = mx.random.normal((BS, H, D), key=mx.random.key(2))
    pool.write(0, fresh, fresh, pool.plan_write([0] * BS, list(range(BS)), list(range(BS))))
    assert 0 not in pool._key_master
    stored = pool.gather(0, [0], BS)[0][0]  # [H, BS, D] the new keys as stored
    shift_block_keys(pool, [0], _rotate)
    w = np.array(ROPE(stored.reshape(H * BS, 1, D), offset=DELTA).reshape(H, BS, D))
    got = np.array(pool.gather(0, [0], BS)[0][0])
    np.testing.assert_allclose(got[:, :4], w[:, :4], atol=1e-4)
    step = (w[:, 4:].max(axis=1, keepdims=True) - w[:, 4:].min(axis=1, keepdims=True)) / 15
    assert (np.abs(got[:, 4:] - w[:, 4:]) <= 0.5 * step * 1.02 + 2e-3).all()  # the new keys, not the old master
