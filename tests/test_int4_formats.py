"""int4 after issue #19 (keys with 8-bit metadata, values g32) and before it (`int4-f16`): session files made with
the old layout keep their format name and open with the settings the refusal names, with equal tokens."""

import re

import pytest

from zkv_mlx import ZKV
from zkv_mlx.errors import SessionMismatchError
from zkv_mlx.storage import session_file

# The format name (after "<dtype>;block=32;") that --kv-quant int4 wrote before issue #19 (commit b5f1ed1), for
# head_dim >= 64 (smaller heads clip the value group to head_dim, as before)
OLD_INT4 = "k=q4c32;v=q4g{g};sinks=4"
MESSAGE = "Paged attention keeps keys and values in fixed-size blocks, so a repeated prefix is computed once. " * 3
TURN2 = {"role": "user", "content": "And in one sentence?"}
KW = dict(ssd_cache="off", kv_cache_memory="16MB")
FLAG_KW = {"--kv-quant": "kv_quant", "--kv-dtype": "kv_dtype", "--block-size": "block_size",
           "--kv-group-size": "kv_group_size"}


def _flags(message: str) -> dict:
    # "start zkv-mlx with --kv-quant int4-f16 --kv-dtype float32 --block-size 32 (...)" -> ZKV keyword arguments
    got = dict(re.findall(r"(--[a-z-]+) (\S+)", message.split("start zkv-mlx with", 1)[1]))
    return {FLAG_KW[k]: int(v) if v.isdigit() else v for k, v in got.items()}


def _chat(s):
    return s.chat(MESSAGE, temperature=0, max_tokens=8, ignore_eos=True)


def test_old_int4_session_file_opens_with_the_named_settings_and_equal_tokens(tiny_model_dir, tmp_path):
    # llama tiny: head_dim 16, so decode and prefill read the pool by the same path (as test_storage_matrix)
    path = str(tiny_model_dir("llama"))
    with ZKV(path, kv_quant="int4-f16", **KW) as old:
        s = old.create_session("old-int4")
        turn1 = _chat(s)
        f = s.export(tmp_path / "old.zkvs")
        lm = old.engine.lm
        h, d = lm.n_kv_heads, lm.head_dim
    g = min(64, d)
    meta = session_file.read(f).meta
    assert meta["kv_format"].endswith(";block=32;" + OLD_INT4.format(g=g))
    # the old layout per layer and block: K packed 4-bit + float16 scale and bias per channel (sink keys are a
    # section of their own), V packed 4-bit + float16 scale and bias per 64-element group
    assert meta["block_shape"][-1] == h * 32 * d // 2 + 2 * h * d * 2
    assert meta["v_block_shape"][-1] == h * 32 * d // 2 + 2 * h * 32 * (d // g) * 2

    with ZKV(path, kv_quant="int4", **KW) as new:  # the new default refuses it and names the fix, losing nothing
        free = new.kv_cache_stats()["blocks_free"]
        with pytest.raises(SessionMismatchError, match="--kv-quant int4-f16") as e:
            new.import_session(str(f))
        assert new.kv_cache_stats()["blocks_free"] == free
        assert OLD_INT4.format(g=g) in str(e.value) and f"k=q4c32e4m3;v=q4g{min(32, d)};sinks=4" in str(e.value)
    flags = _flags(str(e.value))
    assert flags["kv_quant"] == "int4-f16"
    with ZKV(path, **flags, **KW) as again:
        got = again.import_session(str(f), name="old-again").chat([TURN2], temperature=0, max_tokens=8, ignore_eos=True)
    with ZKV(path, kv_quant="int4-f16", prompt_cache=False, **KW) as cold:
        want1 = cold.chat(MESSAGE, temperature=0, max_tokens=8, ignore_eos=True)
        history = [{"role": "user", "content": MESSAGE}, {"role": "assistant", "content": want1}]
        want2 = cold.chat(history + [TURN2], temperature=0, max_tokens=8, ignore_eos=True)
    assert turn1 == want1 and got == want2


def test_new_int4_session_file_records_its_format(tiny_model_dir, tmp_path):
    path = str(tiny_model_dir("llama"))
    with ZKV(path, kv_quant="int4", **KW) as m:
        s = m.create_session("new-int4")
        _chat(s)
        f = s.export(tmp_path / "new.zkvs")
    assert session_file.read(f).meta["kv_format"].endswith(";block=32;k=q4c32e4m3;v=q4g16;sinks=4")  # head_dim 16
    with ZKV(path, kv_quant="int4-f16", **KW) as old, pytest.raises(SessionMismatchError, match="--kv-quant int4 "):
        old.import_session(str(f))
