"""Build an mlx-lm model from a GGUF file read by `mx.load` (Q4_0/Q4_1/Q8_0/F16/F32).

`mx.load` returns quantized GGUF tensors as MLX affine triples (`name.weight` uint32 + `.scales` + `.biases`,
group 32) and the metadata dict. llama.cpp's converter permutes llama q/k rows for its rope, so llama-family
GGUF weights need `rope_traditional=True`; qwen2/qwen3 GGUFs keep the NeoX layout.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..errors import ModelLoadError

SUPPORTED = ("llama", "qwen2", "qwen3")

_LAYER_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _scalar(meta: dict, key: str, default=None):
    v = meta.get(key, default)
    if isinstance(v, mx.array):
        return v.item()
    return v


def read_gguf(path: Path) -> tuple[dict, dict]:
    """Reads a GGUF file, turning any failure into a ModelLoadError naming the file."""
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError with the parser's message
        raise ModelLoadError(
            f"cannot read GGUF file {path}: {e}. The file is corrupt or of an unsupported GGUF type "
            "(supported: F32, F16, Q8_0, Q4_0, Q4_1)."
        ) from None
    return weights, meta


def gguf_model_args(meta: dict, weights: dict) -> dict:
    """Maps GGUF metadata to an mlx-lm config dict.

    Returns:
        A dict usable by mlx-lm's ModelArgs.from_dict for the family.
    """
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED:
        raise ModelLoadError(
            f"unsupported model family {arch!r} in GGUF; supported families: {', '.join(SUPPORTED)}"
        )
    a = arch
    try:
        hidden = int(_scalar(meta, f"{a}.embedding_length"))
        n_heads = int(_scalar(meta, f"{a}.attention.head_count"))
        cfg = {
            "model_type": arch,
            "hidden_size": hidden,
            "num_hidden_layers": int(_scalar(meta, f"{a}.block_count")),
            "intermediate_size": int(_scalar(meta, f"{a}.feed_forward_length")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(_scalar(meta, f"{a}.attention.head_count_kv", n_heads)),
            "rms_norm_eps": float(_scalar(meta, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(_scalar(meta, f"{a}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(_scalar(meta, f"{a}.context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in weights,
        }
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"GGUF metadata is incomplete for family {arch!r}: {e}") from None
    head_dim = _scalar(meta, f"{a}.attention.key_length")
    cfg["head_dim"] = int(head_dim) if head_dim else hidden // n_heads
    emb = weights.get("token_embd.weight")
    if emb is None:
        raise ModelLoadError("GGUF file has no token_embd.weight tensor")
    cfg["vocab_size"] = int(emb.shape[0])
    if arch == "llama":
        cfg["rope_traditional"] = True
    if arch == "qwen2":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in weights
    return cfg


def _rename(name: str) -> str:
    if name.startswith("token_embd."):
        return "model.embed_tokens." + name.split(".", 1)[1]
    if name.startswith("output_norm."):
        return "model.norm." + name.split(".", 1)[1]
    if name.startswith("output."):
        return "lm_head." + name.split(".", 1)[1]
    if name.startswith("blk."):
        _, idx, part, suffix = name.split(".", 3)
        if part not in _LAYER_MAP:
            raise ModelLoadError(f"unexpected GGUF tensor {name!r}")
        return f"model.layers.{idx}.{_LAYER_MAP[part]}.{suffix}"
    if name == "rope_freqs.weight":
        return ""
    raise ModelLoadError(f"unexpected GGUF tensor {name!r}")


def gguf_weights(weights: dict) -> tuple[dict, dict]:
    """Renames GGUF tensors to mlx-lm names.

    Returns:
        (weights, quant) where quant maps a module path to {"group_size", "bits"} for quantized tensors.
    """
    out, quant = {}, {}
    for name, w in weights.items():
        new = _rename(name)
        if new:
            out[new] = w
    for name, w in out.items():
        if name.endswith(".scales"):
            mod = name[: -len(".scales")]
            packed = out[mod + ".weight"]
            group = 32  # every GGUF block type mx.load reads uses 32-element groups
            in_features = w.shape[-1] * group
            bits = packed.shape[-1] * 32 // in_features
            quant[mod] = {"group_size": group, "bits": int(bits)}
    return out, quant


def build_model_from_gguf(path: Path, weights: dict, meta: dict, get_classes):
    """Builds the mlx-lm model with weights as stored (quantized where the GGUF is).

    Args:
        path: the file (for messages). weights, meta: from `read_gguf`.
        get_classes: model_type -> (Model class, ModelArgs class).
    Returns:
        (model, mlx-lm config dict).
    """
    cfg = gguf_model_args(meta, weights)
    model_class, args_class = get_classes(cfg["model_type"])
    w, quant = gguf_weights(weights)
    model = model_class(args_class.from_dict(cfg))
    if quant:
        nn.quantize(model, class_predicate=lambda p, m: quant.get(p, False) if hasattr(m, "to_quantized") else False)
    try:
        model.load_weights(list(w.items()), strict=True)
    except ValueError as e:
        raise ModelLoadError(f"GGUF tensors in {path} do not match a {cfg['model_type']} model: {e}") from None
    return model, cfg
