"""Shared fixtures: tiny random-weight models (llama/qwen2/qwen3) written as mlx-lm directories, isolated dirs."""

import json

import zkv_mlx  # noqa: F401  (loads OpenBLAS before anything imports mlx.core)

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from zkv_mlx import paths

TINY = {
    "llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=512, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  max_position_embeddings=512, tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, max_position_embeddings=512, tie_word_embeddings=False),
    # hybrid: linear-attention (gated delta) state layers between full-attention ones, MoE MLPs
    "qwen3_next": dict(model_type="qwen3_next", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                       rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False,
                       linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
                       decoder_sparse_step=1, shared_expert_intermediate_size=64, moe_intermediate_size=64,
                       mlp_only_layers=[], full_attention_interval=2, partial_rotary_factor=0.5),
    # llama whose layer_types make every other layer a sliding window of 6 tokens (mlx-lm honours both)
    "llama_swa": dict(model_type="llama", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=512, tie_word_embeddings=True, sliding_window=6,
                      layer_types=["sliding_attention", "full_attention"] * 2),
}


@pytest.fixture(scope="module", autouse=True)
def _isolated_dirs(tmp_path_factory):
    # Never touch the user's real data/cache dirs from tests, and give every test module its own (SSD blocks
    # and sessions of one module must not turn into cache hits in another). Module scope: set before the
    # modules' own model fixtures start their engines.
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("zkv-dirs")
    mp.setenv("ZKV_DATA_DIR", str(base / "data"))
    mp.setenv("ZKV_CACHE_DIR", str(base / "cache"))
    yield base
    mp.undo()


@pytest.fixture(scope="session")
def bundled_tokenizer():
    from zkv_mlx.models.tokenizer import tokenizer_from_gguf_metadata

    _, meta = mx.load(str(paths.default_model_path()), return_metadata=True)
    return tokenizer_from_gguf_metadata(meta)


def write_tiny_model(path, family: str, tokenizer, seed: int = 0):
    """Writes a random-weight mlx-lm model directory of the given family (vocab of the bundled tokenizer)."""
    from mlx_lm.utils import _get_classes

    cfg = dict(TINY[family], vocab_size=tokenizer.vocab_size)
    model_class, args_class = _get_classes(cfg)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(cfg))
    # Larger-than-default init so greedy choices are not near-ties.
    params = tree_flatten(model.parameters())
    new = []
    for k, v in params:
        if k.endswith("norm.weight"):
            new.append((k, mx.ones_like(v)))
        else:
            new.append((k, mx.random.normal(v.shape) * (0.5 if "embed" in k else 0.15)))
    model.load_weights(new)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(cfg))
    tokenizer.save(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_tokenizer):
    """family -> path of a tiny random model directory (created once per session)."""
    cache = {}

    def make(family: str):
        if family not in cache:
            cache[family] = write_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family, bundled_tokenizer)
        return cache[family]

    return make
