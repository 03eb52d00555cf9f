"""The one attention dispatch point (models/attention.py): path choice, per-step metadata, and `attend`."""

import mlx.core as mx
import numpy as np
import pytest

from zkv_mlx.kernels.dispatch import reference_paged_attention
from zkv_mlx.kernels.kv_quant import QuantSpec
from zkv_mlx.kernels.reference import GROUPED_MAX_LEN
from zkv_mlx.models.attention import DECODE_PATHS, attend, decode_metadata, decode_path
from zkv_mlx.storage.kv_pool import KVPool

BS, H_KV, H_Q, D = 16, 2, 4, 64


def _pool(quant=None, num_blocks=80):
    pool = KVPool(1, num_blocks, H_KV, BS, D, mx.float32, quant)
    rng = np.random.default_rng(0)
    if quant is None:
        pool.k[0] = mx.array(rng.standard_normal(pool.k[0].shape).astype(np.float32))
        pool.v[0] = mx.array(rng.standard_normal(pool.v[0].shape).astype(np.float32))
    return pool


@pytest.mark.parametrize("choice, quant, want", [
    ("reference", None, "grouped"),
    ("reference", QuantSpec(8, 8, 64, False), "quantized"),
    ("metal", None, "metal"),
    ("metal", QuantSpec(4, 4, 64, True, 4), "metal"),
])
def test_decode_path_is_chosen_in_one_place(monkeypatch, choice, quant, want):
    monkeypatch.setenv("ZKV_KERNELS", choice)
    assert decode_path(_pool(quant, num_blocks=4)) == want
    assert want in DECODE_PATHS


def test_grouped_metadata_groups_short_sequences_and_plans_long_ones(monkeypatch):
    monkeypatch.setenv("ZKV_KERNELS", "reference")
    pool = _pool()
    tables = [[0, 1], [2, 3], [4], list(range(5, 5 + 34))]
    lens = [20, 30, 9, GROUPED_MAX_LEN + 1]
    plan = pool.plan_write([t[(n - 1) // BS] for t, n in zip(tables, lens)], [(n - 1) % BS for n in lens])
    meta = decode_metadata(pool, [n - 1 for n in lens], plan, tables, lens, want_mass=False)
    assert (meta.path, meta.is_prefill, meta.kernel_args, meta.mass) == ("grouped", False, None, None)
    assert sorted(members for members, _, _ in meta.groups) == [[0, 1], [2]]
    assert [p is None for p in meta.plans] == [True, True, True, False]
    # h2o wants the attention mass: every sequence alone, with its plan
    meta = decode_metadata(pool, [n - 1 for n in lens], plan, tables, lens, want_mass=True)
    assert meta.groups is None and all(p is not None for p in meta.plans) and meta.mass == [[], [], [], []]


def test_metal_metadata_pads_the_block_tables(monkeypatch):
    monkeypatch.setenv("ZKV_KERNELS", "metal")
    pool = _pool()
    tables, lens = [[7], [3, 4, 5]], [5, 40]
    meta = decode_metadata(pool, [4, 39], pool.plan_write([7, 5], [4, 7]), tables, lens, want_mass=False)
    padded, context_lens, max_len = meta.kernel_args
    assert padded.tolist() == [[7, 0, 0], [3, 4, 5]] and context_lens.tolist() == lens and max_len == 40
    assert meta.groups is None and meta.plans is None


def test_grouped_attend_matches_the_reference_and_is_batch_invariant(monkeypatch):
    monkeypatch.setenv("ZKV_KERNELS", "reference")
    pool = _pool()
    tables = [[0, 1], [2, 3], [9, 4, 6], list(range(10, 10 + 34))]
    lens = [20, 30, 33, GROUPED_MAX_LEN + 20]
    q = mx.array(np.random.default_rng(1).standard_normal((len(lens), H_Q, 1, D)).astype(np.float32))
    plan = pool.plan_write([], [])

    def run(idx):
        meta = decode_metadata(pool, [lens[i] - 1 for i in idx], plan, [tables[i] for i in idx],
                               [lens[i] for i in idx], want_mass=False)
        return attend(q[mx.array(idx)], 0, meta, D ** -0.5)

    batched = run([0, 1, 2, 3])
    for i in range(4):
        assert mx.array_equal(run([i])[0], batched[i]).item()  # bitwise equal alone and in the batch
    nb = max(len(t) for t in tables)
    padded = mx.array([t + [0] * (nb - len(t)) for t in tables], dtype=mx.int32)
    want = reference_paged_attention(q, pool.k[0], pool.v[0], padded, mx.array(lens, dtype=mx.int32), D ** -0.5)
    assert mx.allclose(batched, want, atol=1e-5).item()
