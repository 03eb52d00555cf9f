"""Tiny random-weight models of many mlx-lm architectures, for the model test matrix (issue #16).

Each entry of `ARCHS` is built from the installed mlx-lm's own `ModelArgs` (tiny dims: hidden 64, 2-4 layers,
few experts, sliding windows of a few tokens so eviction happens in short prompts) and written as an mlx-lm model
directory by `write_zoo_model`. `reference_greedy` is mlx-lm's own greedy generation on the same directory.

    python -m tests.model_zoo --readme   # the README's table of supported architectures
    python -m tests.model_zoo --check    # build, round-trip and run every entry through mlx-lm
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import zkv_mlx  # noqa: F401  (loads OpenBLAS before anything imports mlx.core)

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

CATEGORIES = ("paged", "window", "sinks", "hybrid", "mla", "refused")
README_START, README_END = "<!-- archs:start -->", "<!-- archs:end -->"

# Keys every tiny config starts from; each ModelArgs keeps only the ones it declares.
COMMON = dict(
    hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, rms_norm_eps=1e-5, norm_eps=1e-5, layer_norm_eps=1e-5, layer_norm_epsilon=1e-5,
    norm_epsilon=1e-5, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
    attention_bias=False, mlp_bias=False, rope_scaling=None,
)

# MoE fields shared by the routed-expert families (4 experts, 2 per token).
MOE = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           norm_topk_prob=True)


@dataclass(frozen=True, slots=True)
class Arch:
    """One matrix entry.

    Args:
        name: entry id (an mlx-lm model_type, or model_type-variant for a feature variant).
        model_type: the config's model_type (selects the mlx-lm module).
        category: "paged" (standard attention), "window" (sliding-window layers), "sinks" (learned attention
            sinks), "hybrid" (SSM / linear-attention state layers), "mla" (multi-head latent attention, dense path),
            "refused" (a feature the engine does not implement: loading must raise ModelLoadError).
        default: in the default test run; else in the slower `zoo_slow` set.
        config: overrides on top of `COMMON` (vocab_size is the tokenizer's).
        window: the sliding window in tokens, for entries with window layers (None otherwise).
        embed_std: the embedding init's standard deviation (smaller for tied heads, which else repeat a token).
        refuses: for "refused" entries, a word the ModelLoadError must contain (the unimplemented feature).
    """

    name: str
    model_type: str
    category: str
    default: bool
    config: dict = field(default_factory=dict)
    window: int | None = None
    embed_std: float = 0.5
    refuses: str | None = None

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"{self.name}: category {self.category!r} is not one of {CATEGORIES}")


def _a(name, category, default=False, model_type=None, window=None, embed_std=0.5, refuses=None, **config) -> Arch:
    if window is not None:
        config.setdefault("sliding_window", window)
    return Arch(name, model_type or name, category, default, config, window, embed_std, refuses)


ARCHS: list[Arch] = [
    # -- standard softmax attention, paged --------------------------------------------------------------------
    _a("llama", "paged", True),
    _a("llama-rope-llama3", "paged", model_type="llama", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    _a("llama-rope-linear", "paged", model_type="llama", rope_scaling={"type": "linear", "factor": 2.0}),
    _a("llama-rope-yarn", "paged", model_type="llama", rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    _a("mistral", "paged"),
    _a("qwen2", "paged", True, attention_bias=True),
    _a("qwen3", "paged"),
    _a("qwen3-tied", "paged", model_type="qwen3", tie_word_embeddings=True, embed_std=0.15),
    _a("qwen2_moe", "paged", True, shared_expert_intermediate_size=64, **MOE),
    _a("qwen3_moe", "paged", decoder_sparse_step=1, mlp_only_layers=[], **MOE),
    _a("mixtral", "paged", **MOE),
    _a("gemma", "paged", embed_std=0.15),  # tied head on sqrt(hidden)-scaled embeddings
    _a("gemma2", "paged", True, embed_std=0.05, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
       final_logit_softcapping=30.0),
    _a("phi3", "paged", True),
    _a("olmo2", "paged"),
    _a("granite", "paged", logits_scaling=2.0, attention_multiplier=0.25, embedding_multiplier=2.0,
       residual_multiplier=0.5),
    _a("starcoder2", "paged"),
    _a("internlm2", "paged", bias=False),
    _a("smollm3", "paged", num_hidden_layers=4, no_rope_layer_interval=2),
    _a("glm4", "paged", partial_rotary_factor=0.5),
    _a("phi", "paged", partial_rotary_factor=0.5, num_key_value_heads=4),
    _a("stablelm", "paged", use_qkv_bias=True, partial_rotary_factor=0.25),
    _a("cohere", "paged", logit_scale=0.5, embed_std=0.15),
    _a("minicpm", "paged", dim_model_base=32, scale_depth=1.4, scale_emb=2.0),
    _a("exaone", "paged", num_layers=2),
    _a("granitemoe", "paged", logits_scaling=2.0, attention_multiplier=0.25, embedding_multiplier=2.0,
       residual_multiplier=0.5, **MOE),
    _a("ernie4_5", "paged", use_bias=False),
    _a("seed_oss", "paged"),
    _a("apertus", "paged", post_norm=False, qk_norm=True),
    _a("olmoe", "paged", **MOE),
    _a("helium", "paged"),
    _a("internlm3", "paged", bias=False, qkv_bias=False),
    _a("nemotron", "paged", hidden_act="relu2", partial_rotary_factor=0.5),
    _a("bailing_moe", "paged", num_shared_experts=1, first_k_dense_replace=1, **MOE),
    _a("dots1", "paged", n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.0, **MOE),
    # Cross-layer attention: every second layer reuses the previous layer's K/V.
    _a("hunyuan", "paged", use_cla=True, cla_share_factor=2, moe_topk=2, num_shared_expert=1,
       use_mixed_mlp_moe=True, use_qk_norm=True, embed_std=0.15, rope_scaling={"type": "dynamic", "factor": 1.0, "alpha": 1000.0},
       **MOE),
    # -- sliding-window layers (RotatingKVCache in make_cache) ------------------------------------------------
    _a("llama-sliding", "window", True, model_type="llama", window=5, num_hidden_layers=3,
       layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    _a("gemma3_text", "window", True, window=6, num_hidden_layers=4, sliding_window_pattern=2,
       query_pre_attn_scalar=16),
    # A window wider than the smallest prefill chunk (16): chunks both smaller and larger than the window.
    _a("gemma3_text-w24", "window", model_type="gemma3_text", window=24, num_hidden_layers=2,
       sliding_window_pattern=2, query_pre_attn_scalar=16),
    _a("cohere2", "window", window=7, sliding_window_pattern=2, logit_scale=0.5),
    _a("exaone4", "window", window=6, sliding_window_pattern="LG", embed_std=0.02),
    _a("olmo3", "window", window=6, layer_types=["sliding_attention", "full_attention"]),
    _a("ministral3", "window", window=6, layer_types=["sliding_attention", "full_attention"],
       rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "llama_4_scaling_beta": 0.1,
                        "original_max_position_embeddings": 16}),
    # -- learned attention sinks -------------------------------------------------------------------------------
    _a("gpt_oss", "sinks", True, window=8, layer_types=["sliding_attention", "full_attention"],
       num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
    # -- SSM / linear-attention hybrids ------------------------------------------------------------------------
    _a("qwen3_next", "hybrid", True, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
       linear_value_head_dim=16, linear_conv_kernel_dim=4, decoder_sparse_step=1, mlp_only_layers=[],
       shared_expert_intermediate_size=64, partial_rotary_factor=0.5, full_attention_interval=2, **MOE),
    _a("lfm2", "hybrid", True, conv_bias=False, conv_L_cache=3, block_dim=64, block_ff_dim=128, block_multiple_of=16,
       block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=False, full_attn_idxs=[1]),
    _a("falcon_h1", "hybrid", mamba_d_conv=4, mamba_d_head=16, mamba_d_ssm=64, mamba_d_state=16, mamba_n_heads=4,
       mamba_n_groups=1, mamba_chunk_size=16, embedding_multiplier=1.0, lm_head_multiplier=1.0,
       key_multiplier=1.0, attention_out_multiplier=1.0, ssm_out_multiplier=1.0, ssm_in_multiplier=1.0),
    _a("granitemoehybrid", "hybrid", layer_types=["mamba", "attention"], embedding_multiplier=2.0,
       attention_multiplier=0.25, logits_scaling=2.0, residual_multiplier=0.5, shared_intermediate_size=64,
       mamba_n_heads=4, mamba_d_head=16, mamba_proj_bias=False, mamba_d_state=16, mamba_d_conv=4, mamba_n_groups=1,
       mamba_conv_bias=True, tie_word_embeddings=True, embed_std=0.15, **MOE),
    _a("nemotron_h", "hybrid", hybrid_override_pattern="M*-", num_hidden_layers=3, mamba_num_heads=4,
       mamba_head_dim=16, mamba_proj_bias=False, ssm_state_size=16, conv_kernel=4, n_groups=1, use_bias=False,
       use_conv_bias=True),
    # -- multi-head latent attention (dense path) --------------------------------------------------------------
    _a("deepseek_v3", "mla", True, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
       qk_nope_head_dim=16, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
       routed_scaling_factor=1.0, **MOE),
    _a("deepseek_v2", "mla", kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
       n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="greedy",
       rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}, **MOE),
    _a("minicpm3", "mla", kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, dim_model_base=32,
       scale_depth=1.4, scale_emb=2.0, rope_scaling={"original_max_position_embeddings": 512, "short_factor": 1.0,
                                                      "long_factor": 1.0}),
]

# Real mlx-lm configs whose make_cache() asks for a cache the engine does not implement. (No mlx-lm 0.32.2 model
# returns RotatingKVCache(keep > 0): only make_prompt_cache(max_kv_size=...) does, which is not a model's plan.)
REFUSED: list[Arch] = [
    # llama4 with attention chunking: ChunkedKVCache on 3 of every 4 layers.
    _a("llama4-chunked", "refused", True, model_type="llama4", refuses="chunk", text_config=dict(
        model_type="llama4_text", attention_bias=False, attention_chunk_size=4, head_dim=16, hidden_size=64,
        interleave_moe_layer_step=2, intermediate_size=64, intermediate_size_mlp=128, max_position_embeddings=512,
        num_attention_heads=4, num_experts_per_tok=1, num_hidden_layers=4, num_key_value_heads=2,
        num_local_experts=2, rms_norm_eps=1e-5, rope_scaling=None, rope_theta=10000.0, use_qk_norm=True)),
]

# Features an engine may implement or refuse (ModelLoadError containing `refuses`), never decode differently.
EQUAL_OR_REFUSE: list[Arch] = [
    # mlx-lm's dynamic NTK rope takes its base from the call's length (shape + offset), so it depends on how a
    # prompt is split into calls, and a batched call (array offsets) raises in mlx-lm itself. It acts only past
    # max_position_embeddings: 16 here, so the test prompts reach it.
    _a("llama-rope-dynamic", "paged", True, model_type="llama", refuses="dynamic",
       rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
]

BY_NAME = {a.name: a for a in ARCHS + REFUSED + EQUAL_OR_REFUSE}


def default_set() -> list[Arch]:
    """The entries of the default test run."""
    return [a for a in ARCHS if a.default]


def slow_set() -> list[Arch]:
    """The entries of the `zoo_slow` set."""
    return [a for a in ARCHS if not a.default]


def zoo_config(arch: Arch, vocab_size: int) -> dict:
    """The config.json of an entry: `COMMON` + the entry's overrides, kept to the keys its ModelArgs declares.

    Args:
        arch: the entry. vocab_size: the tokenizer's vocabulary size.
    Returns:
        A JSON-able dict with model_type first.
    """
    from mlx_lm.utils import _get_classes

    full = dict(COMMON, **arch.config, model_type=arch.model_type, vocab_size=vocab_size)
    if "text_config" in full:  # a wrapper config (llama4): the text model's vocab is the tokenizer's too
        full["text_config"] = dict(full["text_config"], vocab_size=vocab_size)
    _, args_class = _get_classes(full)
    declared = set(inspect.signature(args_class).parameters)
    return {"model_type": arch.model_type, **{k: v for k, v in full.items() if k in declared and k != "model_type"}}


def _init_value(key: str, v: mx.array, embed_std: float) -> mx.array:
    # Norm scales at one (gemma's "1 + w" norms then double, still fine); other vectors and matrices random and
    # larger than mlx-lm's defaults so greedy choices are not near-ties (as conftest.write_tiny_model).
    leaf = key.rsplit(".", 1)[-1]
    if "norm" in key and leaf == "weight" and v.ndim == 1:
        return mx.ones_like(v)
    if leaf == "A_log":  # SSM decay: A = -exp(A_log) must stay moderate for a stable recurrence
        return mx.random.uniform(-1.0, 0.5, v.shape)
    if leaf in ("dt_bias", "D", "sinks"):
        return mx.random.normal(v.shape) * 0.5
    scale = embed_std if "embed" in key else 0.15
    return (mx.random.normal(v.shape) * scale).astype(v.dtype)


def build_model(arch: Arch, vocab_size: int, seed: int = 0):
    """Instantiates the mlx-lm model of an entry with random weights.

    Returns:
        (model, config dict).
    """
    from mlx_lm.utils import _get_classes

    cfg = zoo_config(arch, vocab_size)
    model_class, args_class = _get_classes(cfg)
    mx.random.seed(seed + zlib.crc32(arch.name.encode()))  # entries with the same shapes get different weights
    model = model_class(args_class.from_dict(cfg))
    model.load_weights([(k, _init_value(k, v, arch.embed_std)) for k, v in tree_flatten(model.parameters())])
    mx.eval(model.parameters())
    return model, cfg


def write_zoo_model(path, arch: Arch | str, tokenizer, seed: int = 0) -> Path:
    """Writes an mlx-lm model directory (config.json, model.safetensors, tokenizer files) of a zoo entry.

    The weights are written in mlx-lm's own (already sanitized) layout; `check_round_trip` verifies that
    `mlx_lm.utils.load_model` gives them back unchanged.

    Args:
        path: directory to create. arch: an `Arch` or its name. tokenizer: the bundled tokenizer (its vocab size
            sets the model's; it is saved beside the weights). seed: weight seed.
    Returns:
        The directory.
    """
    arch = BY_NAME[arch] if isinstance(arch, str) else arch
    path = Path(path)
    model, cfg = build_model(arch, tokenizer.vocab_size, seed)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    tokenizer.save(path)
    return path


def check_round_trip(path, arch: Arch | str, tokenizer, seed: int = 0) -> None:
    """Asserts that mlx-lm loads the directory back to exactly the weights `build_model` made."""
    from mlx_lm.utils import load_model

    arch = BY_NAME[arch] if isinstance(arch, str) else arch
    want, _ = build_model(arch, tokenizer.vocab_size, seed)
    got, _ = load_model(Path(path))
    a, b = dict(tree_flatten(want.parameters())), dict(tree_flatten(got.parameters()))
    assert a.keys() == b.keys(), f"{arch.name}: parameter names differ: {sorted(a.keys() ^ b.keys())[:5]}"
    for k in a:
        assert a[k].shape == b[k].shape and mx.array_equal(a[k], b[k]).item(), f"{arch.name}: {k} differs"


def reference_greedy(path, prompt_ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """mlx-lm's own greedy generation on the model mlx-lm loads from `path`.

    Args:
        path: an mlx-lm model directory. prompt_ids: token ids. n: tokens to generate.
    Returns:
        (the n generated token ids, the raw logits of each generated step: n float32 arrays of shape [vocab]).
        Logits are captured through `generate_step`'s logits_processors hook (before mlx-lm's log-softmax).
    """
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path))
    logits = []

    def capture(tokens, lg):
        logits.append(np.array(lg[0].astype(mx.float32)))
        return lg

    tokens = [int(t) for t, _ in generate_step(mx.array(prompt_ids), model, max_tokens=n,
                                                logits_processors=[capture])]
    return tokens, logits[:n]  # generate_step computes one step ahead of what it yields


def readme_table() -> str:
    """The README's Markdown table of the architectures the matrix tests: one row per mlx-lm model_type with its
    category, the config variants in the matrix and the test set ("default" or "zoo_slow")."""
    rows: dict[str, list[Arch]] = {}
    for a in ARCHS + REFUSED + EQUAL_OR_REFUSE:
        rows.setdefault(a.model_type, []).append(a)
    lines = ["| mlx-lm model_type | category | config variants in the matrix | test set |", "|---|---|---|---|"]
    for mt in sorted(rows):
        entries = rows[mt]
        cats = ", ".join(dict.fromkeys(a.category for a in entries))
        variants = []
        for a in entries:
            v = a.name[len(mt) + 1:] if a.name != mt else "base"
            if a.window is not None:
                v += f" (window {a.window})"
            if a.refuses:
                v += " (must raise ModelLoadError)" if a.category == "refused" else " (equal or ModelLoadError)"
            variants.append(v)
        sets = ", ".join(dict.fromkeys("default" if a.default else "zoo_slow" for a in entries))
        lines.append(f"| {mt} | {cats} | {'; '.join(variants)} | {sets} |")
    return "\n".join(lines)


def _check_all(names: list[str]) -> int:
    """Builds, writes, round-trips and runs every entry through mlx-lm; prints one line each."""
    import tempfile

    from zkv_mlx import paths
    from zkv_mlx.models.tokenizer import tokenizer_from_gguf_metadata

    _, meta = mx.load(str(paths.default_model_path()), return_metadata=True)
    tok = tokenizer_from_gguf_metadata(meta)
    ids = tok.encode("Paged attention stores keys and values in fixed-size blocks so that")
    bad = 0
    for a in (BY_NAME[n] for n in names) if names else BY_NAME.values():
        with tempfile.TemporaryDirectory() as d:
            try:
                write_zoo_model(d, a, tok)
                check_round_trip(d, a, tok)
                toks, lg = reference_greedy(d, ids, 16)
                finite = all(np.isfinite(x).all() for x in lg)
                print(f"{a.name:22s} ok tokens={len(set(toks))} distinct finite={finite} {toks[:8]}")
                bad += (not finite) or len(set(toks)) < 2
            except Exception as e:  # noqa: BLE001  (a report of every entry, not the first failure)
                bad += 1
                print(f"{a.name:22s} FAIL {type(e).__name__}: {str(e)[:300]}")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.model_zoo", description=__doc__.splitlines()[0])
    p.add_argument("--readme", action="store_true", help="print the README's architecture table")
    p.add_argument("--check", nargs="*", metavar="NAME", help="check entries (all when none named)")
    a = p.parse_args(argv)
    if a.readme:
        print(readme_table())
        return 0
    if a.check is not None:
        return _check_all(a.check)
    p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
