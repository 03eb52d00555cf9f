"""Public: what zkv-mlx makes of a model without starting an engine (`zkv-mlx doctor --model`)."""

from __future__ import annotations


def layer_plan(model: str | None) -> dict:
    """Loads `model` (weights as stored) and describes its layer plan.

    Args:
        model: a GGUF file, an mlx-lm model directory or repo id; None = the bundled default.
    Returns:
        {"model", "architecture", "groups": [{kind, window, dense, n_kv_heads, k_head_dim, v_head_dim, slots,
        kv_bytes_per_token}], "sinks", "vocab_size", "kv_dtype", "notes": [...]} (`models.layer_plan.describe`).
    Raises:
        ModelLoadError: the model cannot load, or needs something zkv-mlx does not implement (named).
    """
    from .models.layer_plan import describe
    from .models.loader import load_model

    lm = load_model(model, "quantized")
    return dict(model=lm.name, architecture=lm.family, kv_dtype=str(lm.dtype).split(".")[-1],
                **describe(lm.plan, lm.dtype))
