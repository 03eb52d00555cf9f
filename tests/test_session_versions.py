"""Session format version 2 (xxh3_128 checksums, issue #20 item 3) and the version 1 files written before it.

tests/data/session_v1.zkvs was written by zkv-mlx at commit 5235717 (format version 1, sha256 checksums) from a
seeded generator: 2 layers, 3 blocks of float16 [2 heads, 4 tokens, 8 dims], 13 token ids.
"""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import xxhash

from zkv_mlx import ZKV
from zkv_mlx.errors import SessionFormatError
from zkv_mlx.storage import session_file

V1 = Path(__file__).parent / "data" / "session_v1.zkvs"


def _v1_arrays():
    # the generator that made the fixture, in the same order
    rng = np.random.default_rng(20)
    ks = [rng.standard_normal((3, 2, 4, 8)).astype(np.float16) for _ in range(2)]
    vs = [rng.standard_normal((3, 2, 4, 8)).astype(np.float16) for _ in range(2)]
    return ks, vs


def _plain_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in ("format", "version", "checksums")}


def test_version_1_file_written_by_the_old_code_still_loads():
    d = session_file.read(V1)
    assert d.meta["version"] == 1 and len(d.meta["checksums"]["k.0"]) == 64  # sha256 hex
    assert d.token_ids == list(range(13)) and d.meta["messages"] == [{"role": "user", "content": "hi"}]
    ks, vs = _v1_arrays()
    assert all(np.array_equal(a, b) for a, b in zip(d.k + d.v, ks + vs))
    assert session_file.read_meta(V1)["version"] == 1
    # the version 1 writer kept for these tests is the old writer, byte for byte
    out = V1.parent.parent / ".v1-again.zkvs"
    try:
        session_file.write(out, session_file.SessionData(meta=_plain_meta(d.meta), k=d.k, v=d.v), version=1)
        assert out.read_bytes() == V1.read_bytes()
    finally:
        out.unlink(missing_ok=True)


def test_version_1_file_with_a_flipped_byte_is_refused(tmp_path):
    raw = bytearray(V1.read_bytes())
    raw[-3] ^= 0x01  # inside v.1, the last tensor
    p = tmp_path / "bad.zkvs"
    p.write_bytes(bytes(raw))
    with pytest.raises(SessionFormatError, match="checksum mismatch in tensor v.1"):
        session_file.read(p)


def test_new_files_are_version_2_with_xxh3_128_checksums(tmp_path):
    d = session_file.read(V1)
    p = tmp_path / "v2.zkvs"
    session_file.write(p, session_file.SessionData(meta=_plain_meta(d.meta), k=d.k, v=d.v))
    e = session_file.read(p)
    assert e.meta["version"] == session_file.VERSION == 2
    for name, a in (("k.0", d.k[0]), ("v.1", d.v[1])):
        assert e.meta["checksums"][name] == xxhash.xxh3_128_hexdigest(a.tobytes())
    assert e.token_ids == d.token_ids and all(np.array_equal(a, b) for a, b in zip(e.k + e.v, d.k + d.v))


@pytest.mark.parametrize("tensor", ["k.0", "v.0", "k.1", "v.1"])
def test_a_flipped_byte_in_any_version_2_tensor_is_refused(tmp_path, tensor):
    d = session_file.read(V1)
    p = tmp_path / "v2.zkvs"
    session_file.write(p, session_file.SessionData(meta=_plain_meta(d.meta), k=d.k, v=d.v))
    raw = bytearray(p.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8:8 + n])[tensor]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0x40
    p.write_bytes(bytes(raw))
    with pytest.raises(SessionFormatError, match=f"checksum mismatch in tensor {tensor} \\(the file is corrupt\\)"):
        session_file.read(p)
    p.write_bytes(bytes(raw[:-7]))
    with pytest.raises(SessionFormatError, match="truncated"):
        session_file.read(p)
    with pytest.raises(SessionFormatError, match="truncated"):
        session_file.read_meta(p)


def _with_meta(src: Path, dst: Path, **changes) -> Path:
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    zkv = json.loads(header["__metadata__"]["zkv"])
    zkv.update(changes)
    header["__metadata__"]["zkv"] = json.dumps(zkv)
    blob = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    return dst


@pytest.mark.parametrize("version", [3, 0, "2", True, None, [2]])
def test_unknown_versions_are_refused_naming_the_supported_ones(tmp_path, version):
    p = _with_meta(V1, tmp_path / "x.zkvs", version=version)
    for read in (session_file.read, session_file.read_meta):
        with pytest.raises(SessionFormatError, match=r"version .* is not supported \(this zkv-mlx reads versions 1, 2\)"):
            read(p)


def test_version_1_checksums_are_not_read_as_version_2(tmp_path):
    # a v1 file relabelled as v2 fails its checks: the version picks the checksum, nothing is guessed
    p = _with_meta(V1, tmp_path / "relabelled.zkvs", version=2)
    with pytest.raises(SessionFormatError, match="checksum mismatch in tensor k.0"):
        session_file.read(p)


@pytest.mark.slow
def test_version_1_export_imports_with_the_same_tokens_and_logits_as_version_2(tmp_path):
    with ZKV(kv_cache_memory="256MB", ssd_cache="off") as model:
        s = model.create_session("v-src")
        s.chat("What is the capital of France?", temperature=0, max_tokens=12)
        f2 = s.export(tmp_path / "v2.zkvs")
        data = session_file.read(f2)
        assert data.meta["version"] == 2
        f1 = tmp_path / "v1.zkvs"
        session_file.write(f1, session_file.SessionData(meta=_plain_meta(data.meta), k=data.k, v=data.v),
                           version=1)
        assert session_file.read_meta(f1)["version"] == 1
        msgs = s.messages + [{"role": "user", "content": "And of Spain?"}]
        ids = model.tokenizer.encode_chat(msgs)
        want = model.next_token_logits(ids)
        model.delete_session("v-src")
        got = {}
        for tag, f in (("v1", f1), ("v2", f2)):
            model.clear_kv_cache()  # the blocks must come from the file, not from the memory cache
            before = model.kv_cache_stats()["hit_tokens"]
            r = model.import_session(str(f), name=f"imp-{tag}")
            assert r.token_ids == data.token_ids
            got[tag] = model.next_token_logits(ids)
            assert model.kv_cache_stats()["hit_tokens"] - before >= len(data.token_ids) // 16 * 16
            model.delete_session(f"imp-{tag}")
        assert np.array_equal(got["v1"], got["v2"])
        assert np.max(np.abs(got["v1"] - want)) <= 1e-4 * (np.max(want) - np.min(want))
        assert int(np.argmax(got["v1"])) == int(np.argmax(want))
