"""The model matrix's entries (issue #16): tiny configs of mlx-lm architectures, by category and test set.

Pure data (no MLX): `tests/model_zoo.py` builds, writes and runs them; `tests/test_model_matrix.py` tests them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ARCHS", "BY_NAME", "CATEGORIES", "COMMON", "EQUAL_OR_REFUSE", "MOE", "README_END", "README_START",
           "REFUSED", "Arch", "default_set", "slow_set"]

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
       use_mixed_mlp_moe=True, use_qk_norm=True, embed_std=0.15,
       rope_scaling={"type": "dynamic", "factor": 1.0, "alpha": 1000.0}, **MOE),
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
