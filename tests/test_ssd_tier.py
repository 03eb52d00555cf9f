"""The SSD tier: spill on eviction, promote on lookup, survive restarts, validated and capped at start-up."""

import os
import subprocess
import sys

import numpy as np
import pytest

from zkv_mlx.config import make_config
from zkv_mlx.engine import Engine
from zkv_mlx.models.loader import load_model
from zkv_mlx.storage.ssd_store import SSDStore

from test_equivalence import PROMPTS, run_engine


def block(i, shape=(2, 2, 4, 8)):
    return np.full(shape, float(i), np.float32), np.full(shape, -float(i), np.float32)


def test_store_roundtrip_lru_cap_and_startup_validation(tmp_path):
    s = SSDStore(tmp_path, capacity=10 << 20)
    for i in range(6):
        s.put(bytes([i]) * 32, [i, i + 1], *block(i))
    s.flush()
    assert len(s) == 6
    k, v = s.get(bytes([3]) * 32, [3, 4])
    assert np.all(k == 3) and np.all(v == -3)
    assert s.get(bytes([3]) * 32, [9, 9]) is None  # same hash, other tokens: refused
    s.close()
    files = sorted(tmp_path.glob("*.kvb"))
    size = files[0].stat().st_size
    # corrupt one file and tear another: both dropped at start-up; an over-full directory is trimmed to the cap
    files[0].write_bytes(files[0].read_bytes()[:-5])
    data = bytearray(files[1].read_bytes())
    data[-1] ^= 0xFF
    files[1].write_bytes(bytes(data))
    (tmp_path / ".leftover.kvb.tmp123").write_bytes(b"x")
    s2 = SSDStore(tmp_path, capacity=2 * size)
    assert s2.dropped_at_start == 2
    assert len(s2) == 2 and s2.used_bytes <= 2 * size
    assert sum(p.stat().st_size for p in tmp_path.glob("*.kvb")) <= 2 * size
    assert not list(tmp_path.glob(".*tmp*"))
    s2.close()


def test_eviction_spills_and_lookup_promotes_with_identical_tokens(tiny_model_dir, bundled_tokenizer, tmp_path):
    path = str(tiny_model_dir("llama"))
    ids = [bundled_tokenizer.encode(p * 4) for p in PROMPTS]
    lm = load_model(path)
    from zkv_mlx.storage.kv_pool import KVPool

    per_block = KVPool.bytes_per_block(lm.n_layers, lm.n_kv_heads, 8, lm.head_dim, lm.dtype)
    # room for about one prompt: every new request evicts (and spills) the previous one's cached blocks
    cfg = make_config(model=path, block_size=8, kv_cache_memory=per_block * 30, ssd_dir=str(tmp_path / "ssd"))
    eng = Engine(lm, cfg)
    fresh = eng.stats()  # an empty SSD tier reports its capacity, not 0 (issue #17 section 7)
    assert fresh["ssd_enabled"] and fresh["ssd_blocks"] == 0 and fresh["ssd_capacity"] == eng.ssd.capacity > 0
    first = [run_engine(eng, [x], 16)[0] for x in ids]
    eng.ssd.flush()
    assert eng.ssd.spills > 0
    again = [run_engine(eng, [x], 16)[0] for x in ids]
    assert again == first
    assert eng.ssd.promotions > 0 and eng.stats()["ssd_promotions"] == eng.ssd.promotions
    eng.close_tiers()


CHILD = r"""
import json, sys
from zkv_mlx import ZKV
m = ZKV(sys.argv[1], kv_cache_memory="16MB", block_size=8)
h = m.submit(list(range(1000, 1000 + 200)), temperature=0, max_tokens=4)
usage = [ev.usage for ev in h if ev.kind == "done"][0]
print(json.dumps({"cached": usage["cached_tokens"], "stats": m.kv_cache_stats()["ssd_blocks"]}))
m.close()
"""


def test_second_process_hits_blocks_computed_by_the_first(tiny_model_dir, tmp_path):
    import json

    env = dict(os.environ, ZKV_CACHE_DIR=str(tmp_path / "cache"), ZKV_DATA_DIR=str(tmp_path / "data"))
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", CHILD, str(tiny_model_dir("llama"))], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["cached"] == 0
    assert runs[1]["cached"] == (200 - 1) // 8 * 8  # every full block but the last token's, from disk


def test_k_and_v_of_different_shapes_round_trip_and_layout_is_validated(tmp_path):
    # int4 with per-channel keys and k8v4 store K and V blocks of different byte sizes (issue 17, section 1)
    layout = (((2, 100), "uint8"), ((2, 60), "uint8"))
    s = SSDStore(tmp_path, capacity=10 << 20, layout=layout)
    k, v = np.arange(200, dtype=np.uint8).reshape(2, 100), np.arange(120, dtype=np.uint8).reshape(2, 60)
    s.put(b"\x01" * 32, [1, 2], k, v)
    with pytest.raises(ValueError, match="layout"):
        s.put(b"\x02" * 32, [1, 2], v, v)  # a block that could never be read back is refused at once
    s.close()
    s2 = SSDStore(tmp_path, capacity=10 << 20, layout=layout)  # a restart keeps and reads it
    assert s2.dropped_at_start == 0 and len(s2) == 1
    k2, v2 = s2.get(b"\x01" * 32, [1, 2])
    assert np.array_equal(k2, k) and np.array_equal(v2, v)
    s2.close()
    other = SSDStore(tmp_path, capacity=10 << 20, layout=(((2, 100), "uint8"), ((2, 61), "uint8")))
    assert other.dropped_at_start == 1 and len(other) == 0  # another format's file is never returned
    other.close()


def test_files_of_the_first_version_are_still_read(tmp_path):
    import hashlib
    import json
    import struct

    from zkv_mlx.storage.ssd_store import MAGIC

    k, v = block(5)
    payload = k.tobytes() + v.tobytes()
    header = json.dumps({"tokens": [5, 6], "shape": list(k.shape), "dtype": "float32",
                         "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    (tmp_path / (("07" * 32) + ".kvb")).write_bytes(MAGIC + struct.pack("<I", len(header)) + header + payload)
    s = SSDStore(tmp_path, capacity=10 << 20, layout=((k.shape, "float32"), (v.shape, "float32")))
    k2, v2 = s.get(bytes([7]) * 32, [5, 6])
    assert np.array_equal(k2, k) and np.array_equal(v2, v)
    s.close()


def _block_file(path, k, v, **checksum):
    import json
    import struct

    from zkv_mlx.storage.ssd_store import MAGIC

    header = json.dumps({"tokens": [5, 6], "k": {"shape": list(k.shape), "dtype": "float32"},
                         "v": {"shape": list(v.shape), "dtype": "float32"}, **checksum}).encode()
    path.write_bytes(MAGIC + struct.pack("<I", len(header)) + header + k.tobytes() + v.tobytes())


def test_block_files_carry_xxh3_128_and_unchecked_or_wrong_files_are_never_returned(tmp_path):
    import hashlib
    import json
    import struct

    import xxhash

    k, v = block(5)
    s = SSDStore(tmp_path, capacity=10 << 20)
    s.put(b"\x01" * 32, [5, 6], k, v)
    s.close()
    raw = (tmp_path / (("01" * 32) + ".kvb")).read_bytes()
    (n,) = struct.unpack("<I", raw[8:12])
    header = json.loads(raw[12:12 + n])
    assert "sha256" not in header and header["xxh3_128"] == xxhash.xxh3_128_hexdigest(k.tobytes() + v.tobytes())
    payload = k.tobytes() + v.tobytes()
    _block_file(tmp_path / (("02" * 32) + ".kvb"), k, v, sha256=hashlib.sha256(payload).hexdigest())  # old, good
    _block_file(tmp_path / (("03" * 32) + ".kvb"), k, v, sha256="0" * 64)  # old, wrong checksum
    _block_file(tmp_path / (("04" * 32) + ".kvb"), k, v)  # no checksum at all
    _block_file(tmp_path / (("05" * 32) + ".kvb"), k, v, xxh3_128=xxhash.xxh3_128_hexdigest(payload + b"x"))
    s2 = SSDStore(tmp_path, capacity=10 << 20)
    assert s2.dropped_at_start == 3 and len(s2) == 2
    for h in (b"\x01" * 32, b"\x02" * 32):
        got_k, got_v = s2.get(h, [5, 6])
        assert np.array_equal(got_k, k) and np.array_equal(got_v, v)
    # a byte flipped after start-up: refused and deleted when promoted, not returned
    p = tmp_path / (("01" * 32) + ".kvb")
    data = bytearray(p.read_bytes())
    data[-9] ^= 0x10
    p.write_bytes(bytes(data))
    assert s2.get(b"\x01" * 32, [5, 6]) is None and not p.exists() and len(s2) == 1
    s2.close()


@pytest.mark.parametrize("kw", [{}, {"kv_quant": "int8"}, {"kv_quant": "int4"}, {"kv_quant": "k8v4"},
                                {"kv_quant": "int4", "kv_key_layout": "token"},
                                {"kv_quant": "int8", "kv_key_layout": "channel"}])
def test_pool_block_layout_is_what_export_gives(kw):
    import mlx.core as mx

    from zkv_mlx.config import KVCacheConfig
    from zkv_mlx.kernels.kv_quant import QuantSpec
    from zkv_mlx.storage.kv_pool import KVPool

    kv = KVCacheConfig(quant=kw.get("kv_quant", "none"), key_layout=kw.get("kv_key_layout", "auto"))
    pool = KVPool(2, 4, 2, kv.block_size, 64, mx.float16, QuantSpec.from_config(kv))
    ks, vs = pool.export_blocks([1, 2])
    (k_shape, k_dtype), (v_shape, v_dtype) = pool.block_layout()
    assert (ks[0].shape[1:], ks[0].dtype.name) == (k_shape, k_dtype)
    assert (vs[0].shape[1:], vs[0].dtype.name) == (v_shape, v_dtype)
    assert (k_shape != v_shape) == (kv.quant == "k8v4" or kv.channel_keys)


ISSUE_CHILD = r"""
import json, sys
from zkv_mlx import ZKV
m = ZKV(kv_cache_memory="256MB", kv_quant=sys.argv[1])
para = ("The quick brown fox jumps over the lazy dog while the river runs past the old mill, and the miller counts "
        "the sacks of flour he will carry to the market in town before the sun goes down. ")
m.generate(para * 3, max_tokens=2, temperature=0)
s = m.kv_cache_stats()
print(json.dumps({"hit_tokens": s["hit_tokens"], "ssd_promotions": s["ssd_promotions"]}))
m.close()
"""


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int4", "k8v4"])
def test_issue_input_two_processes_in_a_row_hit_the_ssd_tier(quant, tmp_path):
    """Issue 17 section 1, as reported: the second process promoted nothing for int4/k8v4 (block files torn)."""
    import json

    env = dict(os.environ, ZKV_CACHE_DIR=str(tmp_path / "cache"), ZKV_DATA_DIR=str(tmp_path / "data"))
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", ISSUE_CHILD, quant], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0] == {"hit_tokens": 0, "ssd_promotions": 0}
    assert runs[1]["hit_tokens"] > 0 and runs[1]["ssd_promotions"] > 0, runs
