"""`KVPool.write`: a one-row write (a B = 1 decode step: a slice update at int indices) stores exactly what the
scatter of index arrays stores, and touches nothing else."""

import mlx.core as mx
import numpy as np
import pytest

from zkv_mlx.storage.kv_pool import KVPool


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_one_row_write_equals_the_scatter(dtype):
    pools = [KVPool(2, 6, 3, 4, 8, dtype) for _ in range(2)]
    rng = np.random.default_rng(0)
    for p in pools:  # same non-zero contents in both
        for layer in range(2):
            p.k[layer] = mx.array(rng.standard_normal((6, 3, 4, 8)).astype(np.float32)).astype(dtype)
            p.v[layer] = mx.array(rng.standard_normal((6, 3, 4, 8)).astype(np.float32)).astype(dtype)
        rng = np.random.default_rng(0)
    for blk, off in ((0, 0), (3, 2), (5, 3)):
        k = mx.array(rng.standard_normal((1, 3, 8)).astype(np.float32))
        v = mx.array(rng.standard_normal((1, 3, 8)).astype(np.float32))
        fast = pools[0].plan_write([blk], [off])
        assert fast.row == (blk, off)
        slow = pools[1].plan_write([blk], [off])
        slow.row = None  # the scatter path
        for layer in range(2):
            pools[0].write(layer, k, v, fast)
            pools[1].write(layer, k, v, slow)
        for layer in range(2):
            assert mx.array_equal(pools[0].k[layer], pools[1].k[layer]).item()
            assert mx.array_equal(pools[0].v[layer], pools[1].v[layer]).item()
            assert mx.array_equal(pools[0].k[layer][blk, :, off], k[0].astype(dtype)).item()
    assert pools[0].plan_write([1, 2], [0, 0]).row is None  # several rows keep the scatter
