"""Restores at disk speed (issue 20 item 3): blocks copied straight into the pool's memory give the same pool as
the MLX scatter they replace, and a session file read in one buffer still rejects any corrupt tensor."""

import mlx.core as mx
import numpy as np
import pytest

from zkv_mlx.errors import SessionFormatError
from zkv_mlx.storage import session_file
from zkv_mlx.storage.kv_pool import KVPool


def _pool(dtype):
    pool = KVPool(3, 12, 2, 4, 8, dtype)
    for layer in range(3):  # something other than zeros everywhere, evaluated as the engine leaves it
        pool.k[layer] = mx.random.normal(pool.k[layer].shape, key=mx.random.key(layer)).astype(dtype)
        pool.v[layer] = mx.random.normal(pool.v[layer].shape, key=mx.random.key(10 + layer)).astype(dtype)
    mx.eval(pool.k, pool.v)
    return pool


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_import_in_place_equals_the_scatter(dtype, monkeypatch):
    ids = [7, 8, 9, 2, 11, 3]  # runs of consecutive ids and single blocks
    src = _pool(dtype)
    ks, vs = src.export_blocks([0, 1, 4, 5, 6, 10])
    fast, slow = _pool(dtype), _pool(dtype)
    fast.import_blocks(ids, ks, vs)
    monkeypatch.setattr(KVPool, "_write_in_place", lambda self, *a: False)
    slow.import_blocks(ids, ks, vs)
    for layer in range(3):
        for a, b in ((fast.k[layer], slow.k[layer]), (fast.v[layer], slow.v[layer])):
            assert mx.array_equal(a, b).item()
    got_k, got_v = fast.export_blocks(ids)
    for layer in range(3):
        assert np.array_equal(got_k[layer], ks[layer]) and np.array_equal(got_v[layer], vs[layer])
    # the blocks not imported are untouched
    keep = mx.array([0, 1, 4, 5, 6, 10])
    assert mx.array_equal(fast.k[1][keep], _pool(dtype).k[1][keep]).item()


def test_in_place_write_refuses_a_buffer_it_cannot_write():
    pool = KVPool(1, 4, 1, 2, 4, mx.float32)
    pool.k[0] = mx.broadcast_to(mx.array(0.0), pool.k[0].shape)  # one scalar seen as a pool: not writable memory
    ks = [np.ones((1, 1, 2, 4), np.float32)]
    assert pool._write_in_place([1], ks, ks) is False
    pool.import_blocks([1], ks, ks)  # the scatter path instead
    assert mx.array_equal(pool.k[0][1], mx.ones((1, 2, 4))).item()


def test_one_buffer_read_still_finds_a_corrupt_tensor(tmp_path):
    k = [np.random.rand(2, 2, 4, 8).astype(np.float32) for _ in range(3)]
    meta = {"model_fingerprint": "m", "kv_format": "f", "dtype": "float32", "name": "s", "user": "local",
            "n_layers": 3, "n_kv_heads": 2, "block_size": 4, "head_dim": 8, "n_blocks": 2,
            "block_shape": [2, 4, 8], "token_ids": list(range(9)), "messages": []}
    path = tmp_path / "s.zkvs"
    session_file.write(path, session_file.SessionData(meta=meta, k=k, v=[a + 1 for a in k]))
    back = session_file.read(path)
    assert all(np.array_equal(a, b) for a, b in zip(back.k, k))
    assert all(np.array_equal(a, b + 1) for a, b in zip(back.v, k))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # the last tensor's last bytes (v.2)
    path.write_bytes(bytes(raw))
    with pytest.raises(SessionFormatError, match="checksum mismatch in tensor v.2"):
        session_file.read(path)
    path.write_bytes(bytes(raw[:-100]))
    with pytest.raises(SessionFormatError, match="truncated"):
        session_file.read(path)


def _small_session(tmp_path):
    """A 3-layer, 2-block session file with 9 token ids (no model needed)."""
    k = [np.random.rand(2, 2, 4, 8).astype(np.float32) for _ in range(3)]
    meta = {"model_fingerprint": "m", "kv_format": "f", "dtype": "float32", "name": "s", "user": "local",
            "n_layers": 3, "n_kv_heads": 2, "block_size": 4, "head_dim": 8, "n_blocks": 2,
            "block_shape": [2, 4, 8], "token_ids": list(range(9)), "messages": []}
    path = tmp_path / "s.zkvs"
    session_file.write(path, session_file.SessionData(meta=meta, k=k, v=k))
    return path


def test_read_meta_reports_a_truncated_copy(tmp_path):
    # listings (`sessions list`, `sessions info`) read only the metadata: a cut-off copy must not pass as healthy
    path = _small_session(tmp_path)
    assert session_file.read_meta(path)["token_ids"] == list(range(9))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SessionFormatError, match="truncated .* copy it again"):
        session_file.read_meta(path)


def test_a_copy_cut_inside_its_header_says_truncated(tmp_path):
    # a copy cut off before the end of the safetensors header is a truncated file, not "not a session file"
    path = _small_session(tmp_path)
    path.write_bytes(path.read_bytes()[:40])
    for reader in (session_file.read_meta, session_file.read):
        with pytest.raises(SessionFormatError, match="truncated .* copy it again"):
            reader(path)
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")  # an absurd header length: not a session file
    with pytest.raises(SessionFormatError, match="not a session file"):
        session_file.read_meta(path)
