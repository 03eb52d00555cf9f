"""Configuration: size parsing, merging TOML + overrides, validation errors that name the bad value."""

import pytest

from zkv_mlx.config import EngineConfig, KVCacheConfig, load_toml, make_config, parse_size
from zkv_mlx.engine.sequence import SamplingParams
from zkv_mlx.errors import ConfigError, ZkvError


# -- parse_size ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, expected",
    [
        ("4GB", 4 * 10**9),
        ("4gb", 4 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5G", int(1.5 * 2**30)),
        ("2 GiB", 2 * 2**30),
        ("100kb", 100_000),
        ("64K", 64 * 1024),
        ("1000", 1000),
        ("1000B", 1000),
        (" 3TB ", 3 * 10**12),
        (1024, 1024),
        (2.0e9, 2_000_000_000),
    ],
)
def test_parse_size_valid(value, expected):
    n = parse_size(value)
    assert n == expected
    assert isinstance(n, int)


def test_parse_size_4gb_is_decimal_and_mib_is_binary():
    assert parse_size("4GB") == 4e9
    assert parse_size("512MiB") == 536_870_912
    assert parse_size("1.5G") == 1_610_612_736


@pytest.mark.parametrize("bad", ["banana", "4XB", "", "GB", "4 G B", "1e9", "4GB!", "--1", "1,5G", "0x10"])
def test_parse_size_bad_strings_name_the_value(bad):
    with pytest.raises(ConfigError) as ei:
        parse_size(bad, "kv_cache_memory")
    msg = str(ei.value)
    assert repr(bad) in msg
    assert "kv_cache_memory" in msg


@pytest.mark.parametrize("bad", [-1, -4096, 0, 0.0, -2.5, "-1GB", "-512", "0GB", "0"])
def test_parse_size_non_positive_is_an_error(bad):
    with pytest.raises(ConfigError) as ei:
        parse_size(bad, "kv_cache_memory")
    assert repr(bad) in str(ei.value)


@pytest.mark.parametrize("bad", [True, False, None, [1], {"a": 1}])
def test_parse_size_wrong_types(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


def test_config_error_is_a_zkv_error_and_value_error():
    with pytest.raises(ZkvError):
        parse_size("nope")
    with pytest.raises(ValueError):
        parse_size("nope")


# -- make_config --------------------------------------------------------------------------------------
def test_make_config_defaults():
    cfg = make_config()
    assert isinstance(cfg, EngineConfig)
    assert cfg.model is None
    assert cfg.max_context is None
    assert cfg.kv.block_size == 16
    assert cfg.kv.memory == "dynamic"
    assert cfg.kv.dtype == "auto"
    assert cfg.weights_dtype == "auto"


def test_make_config_from_toml_dict():
    toml = {"max_context": 2048, "max_num_seqs": 4, "kv": {"block_size": 32, "memory": "1GB", "dtype": "float16"}}
    cfg = make_config(toml)
    assert cfg.max_context == 2048
    assert cfg.max_num_seqs == 4
    assert cfg.kv.block_size == 32
    assert cfg.kv.memory == 10**9
    assert cfg.kv.dtype == "float16"


def test_overrides_win_over_toml():
    toml = {"max_context": 2048, "kv": {"block_size": 32, "memory": "1GB"}}
    cfg = make_config(toml, max_context=512, block_size=64, kv_cache_memory="512MiB")
    assert cfg.max_context == 512
    assert cfg.kv.block_size == 64
    assert cfg.kv.memory == 512 * 2**20


def test_none_overrides_are_ignored():
    toml = {"max_context": 2048, "kv": {"block_size": 32, "memory": "1GB"}}
    cfg = make_config(toml, max_context=None, block_size=None, kv_cache_memory=None, model=None)
    assert cfg.max_context == 2048
    assert cfg.kv.block_size == 32
    assert cfg.kv.memory == 10**9


@pytest.mark.parametrize("alias", ["kv_cache_memory", "kv_cache"])
def test_memory_aliases(alias):
    cfg = make_config(**{alias: "2GB"})
    assert cfg.kv.memory == 2 * 10**9


def test_kv_dtype_alias_and_model():
    cfg = make_config(kv_dtype="bfloat16", model="/some/model.gguf", weights_dtype="quantized")
    assert cfg.kv.dtype == "bfloat16"
    assert cfg.model == "/some/model.gguf"
    assert cfg.weights_dtype == "quantized"


def test_later_override_wins_over_kv_table_key():
    cfg = make_config({"kv": {"memory": "dynamic"}}, kv_cache="3GB")
    assert cfg.kv.memory == 3 * 10**9


@pytest.mark.parametrize("spelling", ["dynamic", "Dynamic", " DYNAMIC "])
def test_dynamic_memory(spelling):
    assert make_config(kv_cache_memory=spelling).kv.memory == "dynamic"
    assert make_config({"kv": {"memory": spelling}}).kv.memory == "dynamic"


def test_unknown_top_level_key_lists_valid_keys():
    with pytest.raises(ConfigError) as ei:
        make_config({"bogus_key": 1})
    msg = str(ei.value)
    assert "bogus_key" in msg
    assert "valid keys" in msg
    for k in ("max_context", "max_num_seqs", "prefill_chunk", "weights_dtype", "model"):
        assert k in msg


def test_unknown_override_is_an_error():
    with pytest.raises(ConfigError, match="max_ctx"):
        make_config(max_ctx=10)


def test_unknown_kv_key_lists_valid_kv_keys():
    with pytest.raises(ConfigError) as ei:
        make_config({"kv": {"size": "1GB"}})
    msg = str(ei.value)
    assert "kv.size" in msg
    for k in ("kv.block_size", "kv.memory", "kv.dtype"):
        assert k in msg


def test_kv_must_be_a_table():
    with pytest.raises(ConfigError, match="kv"):
        make_config({"kv": 5})


def test_kv_as_flat_override_is_rejected():
    with pytest.raises(ConfigError, match="kv"):
        make_config(kv={"block_size": 16})


@pytest.mark.parametrize("bs", [7, 0, -16, 12, 256, "16", 16.0])
def test_bad_block_size(bs):
    with pytest.raises(ConfigError) as ei:
        make_config({"kv": {"block_size": bs}})
    assert "block_size" in str(ei.value)
    assert repr(bs) in str(ei.value)


@pytest.mark.parametrize("bs", [8, 16, 32, 64, 128])
def test_good_block_sizes(bs):
    assert make_config(block_size=bs).kv.block_size == bs


def test_bad_memory_via_make_config_names_value():
    with pytest.raises(ConfigError, match="banana"):
        make_config(kv_cache_memory="banana")
    with pytest.raises(ConfigError, match="-5"):
        make_config(kv_cache_memory=-5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_context": 0}, "max_context"),
        ({"max_context": -3}, "max_context"),
        ({"max_context": "4096"}, "max_context"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_seqs": 5000}, "max_num_seqs"),
        ({"prefill_chunk": 8}, "prefill_chunk"),
        ({"weights_dtype": "int4"}, "weights_dtype"),
        ({"kv_dtype": "float8"}, "kv.dtype"),
    ],
)
def test_engine_value_validation(kwargs, name):
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        make_config(**kwargs)


def test_dynamic_fraction_validation():
    with pytest.raises(ConfigError, match="dynamic_fraction"):
        make_config({"kv": {"dynamic_fraction": 0.0}})
    with pytest.raises(ConfigError, match="dynamic_fraction"):
        make_config({"kv": {"dynamic_fraction": 0.95}})
    assert make_config({"kv": {"dynamic_fraction": 0.5}}).kv.dynamic_fraction == 0.5


def test_kv_cache_config_direct():
    kv = KVCacheConfig(memory="256MB")
    assert kv.memory == 256 * 10**6
    with pytest.raises(ConfigError):
        KVCacheConfig(block_size=7)


# -- load_toml ----------------------------------------------------------------------------------------
def test_load_toml_missing_file(tmp_path):
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as ei:
        load_toml(p)
    assert "not found" in str(ei.value)
    assert str(p) in str(ei.value)


def test_load_toml_directory_is_not_a_file(tmp_path):
    with pytest.raises(ConfigError):
        load_toml(tmp_path)


def test_load_toml_invalid(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("max_context = \n[kv\n")
    with pytest.raises(ConfigError) as ei:
        load_toml(p)
    assert "not valid TOML" in str(ei.value)
    assert str(p) in str(ei.value)


def test_load_toml_then_make_config(tmp_path):
    p = tmp_path / "zkv.toml"
    p.write_text('max_context = 1024\n[kv]\nblock_size = 32\nmemory = "512MiB"\n')
    toml = load_toml(str(p))
    assert toml == {"max_context": 1024, "kv": {"block_size": 32, "memory": "512MiB"}}
    cfg = make_config(toml, max_context=2048)
    assert cfg.max_context == 2048
    assert cfg.kv.block_size == 32
    assert cfg.kv.memory == 512 * 2**20


def test_toml_unknown_key_from_file(tmp_path):
    p = tmp_path / "zkv.toml"
    p.write_text("kv_memory = 5\n")
    with pytest.raises(ConfigError, match="kv_memory"):
        make_config(load_toml(p))


# -- SamplingParams -----------------------------------------------------------------------------------
def test_sampling_defaults_and_normalisation():
    p = SamplingParams()
    assert p.max_tokens == 256 and p.temperature == 0.7 and p.stop == ()
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(temperature=0).temperature == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 101}, "temperature"),
        ({"temperature": None}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"min_p": 1.0}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"seed": "42"}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_sampling_validation(kwargs, name):
    with pytest.raises(ConfigError) as ei:
        SamplingParams(**kwargs)
    msg = str(ei.value)
    assert msg.startswith(name + ":")
    assert repr(next(iter(kwargs.values()))) in msg
