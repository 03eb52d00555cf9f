"""Loads this rank's shard of a model: mlx-lm's own tensor-parallel `model.shard(group)` or its pipeline split
`model.model.pipeline(group)` (the splits of mlx-lm's `sharded_load`), after every rank has checked that all ranks
load the same model with the same settings.

The check runs before the first forward: a sharded forward all-sums partial results across ranks, so ranks with
different weights or shapes would compute garbage or block each other.
"""

from __future__ import annotations

import json

import mlx.core as mx

from ..errors import ConfigError, DistributedError, ModelLoadError
from ..models import loader
from ..models.paged import attach
from ..models.sdpa_hook import HookedCache
from .group import DistGroup

# Bytes of each rank's description in the start-up check (a fixed size: all_gather needs equal shapes).
DESCRIPTION_BYTES = 4096


def describe(cfg, family: str, fingerprint: str) -> dict:
    """What must be equal on every rank: model, weights format, KV format, scheduling limits, library versions."""
    from importlib.metadata import version

    import mlx_lm

    kv = {k: getattr(cfg.kv, k) for k in ("block_size", "dtype", "quant") if hasattr(cfg.kv, k)}
    return {"model fingerprint": fingerprint, "model family": family, "weights_dtype": cfg.weights_dtype,
            "distributed_split": cfg.distributed_split,
            "kv": json.dumps(kv, default=str, sort_keys=True), "max_context": cfg.max_context,
            "max_num_seqs": cfg.max_num_seqs, "prefill_chunk": cfg.prefill_chunk,
            "zkv-mlx": version("zkv-mlx"), "mlx": mx.__version__, "mlx-lm": mlx_lm.__version__}


SAME_FILES = "give every rank the same model files, zkv-mlx settings and library versions"


def check_same_everywhere(group: DistGroup, mine: dict, fix: str = SAME_FILES) -> None:
    """Gathers every rank's description; raises on every rank when one differs from rank 0's.

    Args:
        fix: what the message tells the user to do.
    Raises:
        DistributedError: names the first differing rank, the setting and both values.
    """
    raw = json.dumps(mine, sort_keys=True, default=str).encode()
    if len(raw) > DESCRIPTION_BYTES:
        raise DistributedError(f"rank {group.rank}: start-up description too long ({len(raw)} bytes)")
    buf = mx.zeros((DESCRIPTION_BYTES,), dtype=mx.uint8)
    buf[: len(raw)] = mx.array(list(raw), dtype=mx.uint8)
    # no watchdog: ranks load their weights at their own disk's speed (minutes apart for a large model)
    rows = group.gather(buf, "the start-up check", watchdog=False)
    descs = [json.loads(bytes(r.tolist()).rstrip(b"\0").decode()) for r in rows]
    for r, d in enumerate(descs[1:], start=1):
        for key in descs[0]:
            if d.get(key) != descs[0][key]:
                raise DistributedError(
                    f"rank {r} differs from rank 0 in {key}: {d.get(key)!r} (rank {r}) vs {descs[0][key]!r} "
                    f"(rank 0); {fix}")


def load_shard(cfg, group: DistGroup) -> loader.LoadedModel:
    """This rank's shard of `cfg.model`, attached for the engine (its layer plan has this rank's KV heads).

    Raises:
        ConfigError: settings distributed runs do not support (`check_supported`).
        ModelLoadError: the model cannot be loaded or has no `shard()` (no tensor parallelism in mlx-lm).
        DistributedError: the ranks differ (see `check_same_everywhere`).
    """
    check_supported(cfg)
    path = loader.resolve_model_path(cfg.model)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is not a .gguf file; pass a GGUF file or an mlx-lm model directory")
        weights, meta = loader.read_gguf(path)
        model, mcfg = loader.build_model_from_gguf(path, weights, meta, loader._classes)
        del weights
        tokenizer = loader.tokenizer_from_gguf_metadata(meta)
        files, name = [path], str(meta.get("general.name") or path.stem)
    else:
        model, mcfg, tokenizer, files = loader._load_mlx_dir(path, lazy=True)  # only this rank's shard is read
        name = path.name
    family = str(mcfg["model_type"])
    if cfg.distributed_split == "pipeline":
        return _pipeline_shard(cfg, group, model, mcfg, tokenizer, files, name, path, family)
    if not hasattr(model, "shard"):
        raise ModelLoadError(no_shard_message(f"{name} ({family})", family,
                                              hasattr(getattr(model, "model", None), "pipeline")))
    fp = loader.fingerprint(files, tokenizer.to_json())
    check_same_everywhere(group, describe(cfg, family, fp))
    fmt = loader.choose_weights(model, cfg.weights_dtype)
    heads = _kv_heads(mcfg)
    if heads is not None and heads % group.size:
        raise ModelLoadError(f"{name}: its {heads} KV heads do not split over {group.size} ranks; launch a number "
                             f"of ranks that divides {heads}")
    model.shard(group.group)
    mx.eval(model.parameters())
    plan = attach(model)  # probe forwards run on every rank at once (the sharded layers all-sum)
    # every rank computes the same plan, so every rank refuses (no rank is left waiting)
    if any(not s.paged for s in plan.slots):
        raise ModelLoadError(f"{name} ({family}): distributed runs of models whose attention K/V are not paged "
                             "(MLA's compressed K/V) are not implemented: that K/V is not split by heads, so every "
                             "rank would hold all of it, and no test covers mlx-lm's shard() of it; run it on one "
                             "machine")
    if plan.windows and getattr(cfg.kv, "quant", None) not in (None, "none", "off"):
        raise ModelLoadError(f"{name} ({family}): a quantized KV pool (--kv-quant {cfg.kv.quant}) with "
                             "sliding-window layers is not implemented in distributed runs (the window blocks' "
                             "partial rows are freed on rank 0 only); start every rank without --kv-quant")
    return loader.LoadedModel(
        model=model, tokenizer=tokenizer, name=name, path=path, family=family, fingerprint=fp, plan=plan,
        n_layers=len(plan.paged_slots), n_kv_heads=plan.n_kv_heads, head_dim=plan.head_dim,
        max_context=loader._max_context(mcfg), dtype=plan.kv_dtype, weights_format=fmt,
        weight_bytes=loader._nbytes(model))


def _pipeline_shard(cfg, group: DistGroup, model, mcfg, tokenizer, files, name, path, family):
    # mlx-lm's pipeline split (models/pipeline.py, as its sharded_load does): rank r keeps a contiguous run of
    # layers (rank 0 the last ones), hidden states go rank N-1 -> ... -> 0, then an all_gather gives every rank
    # the last hidden state (each computes the logits). Each rank's layer plan, and so its KV pool, covers its
    # layers only.
    inner = getattr(model, "model", None)
    if not hasattr(inner, "pipeline"):
        raise ModelLoadError(
            f"{name} ({family}): mlx-lm's {family} model has no pipeline() (layer split), so it cannot run with "
            "--distributed pipeline; use --distributed tensor, or a family whose mlx-lm model has pipeline() "
            "(tested: qwen3_5, qwen3_moe)")
    fp = loader.fingerprint(files, tokenizer.to_json())
    check_same_everywhere(group, describe(cfg, family, fp))
    n_layers = len(inner.layers)
    if n_layers < group.size:
        raise ModelLoadError(f"{name}: its {n_layers} layers do not split over {group.size} ranks; launch at most "
                             f"{n_layers} ranks")
    fmt = loader.choose_weights(model, cfg.weights_dtype)
    inner.pipeline(group.group)
    HookedCache.pipeline_tie = True  # the pipeline forward's send tie on the last layer's cache
    mx.eval(model.parameters())  # the other ranks' layers are gone: only this rank's weights are read
    plan = attach(model)
    # rank 0 schedules for every rank: the kinds of layers that change scheduling must be the same everywhere
    check_same_everywhere(group, {"has state layers (SSM / linear attention)": plan.has_state,
                                  "has sliding-window layers": bool(plan.windows),
                                  "has unpaged K/V (MLA)": any(not s.paged for s in plan.slots)},
                          fix="launch a number of ranks that gives every rank the same kinds of layers, or use "
                              "--distributed tensor")
    if plan.windows or any(not s.paged for s in plan.slots):
        raise ModelLoadError(f"{name} ({family}): --distributed pipeline with sliding-window layers or unpaged "
                             "K/V (MLA) is not implemented; use --distributed tensor")
    return loader.LoadedModel(
        model=model, tokenizer=tokenizer, name=name, path=path, family=family, fingerprint=fp, plan=plan,
        n_layers=len(plan.paged_slots), n_kv_heads=plan.n_kv_heads, head_dim=plan.head_dim,
        max_context=loader._max_context(mcfg), dtype=plan.kv_dtype, weights_format=fmt,
        weight_bytes=loader._nbytes(model))


def check_supported(cfg) -> None:
    """Refuses, on every rank before loading anything, settings that distributed runs do not support yet.

    Raises:
        ConfigError: a long-context policy (--kv-policy window/h2o): it ranks and drops blocks by what one
            process sees, and each rank sees only its own heads (docs/distributed.md, Limits).
    """
    kind = cfg.policy.kind
    if kind != "full":
        raise ConfigError(f"--kv-policy {kind} (kv_policy={kind!r}): long-context policies are not supported in "
                          "distributed mode yet (see docs/distributed.md, Limits); drop --kv-policy (or pass "
                          "--kv-policy full), or run without --distributed on one process")


def split_refusal(name: str, family: str, n_kv_heads: int, ranks: int, split: str) -> str | None:
    """Why a model cannot run on `ranks` local ranks, in `zkv-mlx bench distributed`'s terms (its --ranks), checked
    before launching them from what one process loaded (the ranks check the rest at start).

    Args:
        name, family: the model's name and mlx-lm model_type. n_kv_heads: its KV heads per layer.
        ranks: world size. split: "tensor" or "pipeline".
    Returns:
        One line naming the heads, the ranks and a fix that works; None if it splits.
    """
    import importlib

    from mlx_lm.utils import _get_classes

    try:
        model_class, _ = _get_classes({"model_type": family})
    except ValueError:  # a family name mlx-lm does not know: the ranks' own start-up check says what is wrong
        return None
    module = importlib.import_module(model_class.__module__)
    has_pipeline = any(hasattr(c, "pipeline") for c in vars(module).values()
                       if isinstance(c, type) and c.__module__ == module.__name__)
    name = f"{name} ({family})"
    if split == "pipeline":
        return None if has_pipeline else (f"{name}: mlx-lm's {family} model has no pipeline() (layer split); drop "
                                          "--distributed pipeline, or pick a model with pipeline() (e.g. qwen3_moe)")
    if not hasattr(model_class, "shard"):
        return no_shard_message(name, family, has_pipeline)
    if n_kv_heads % ranks == 0:
        return None
    fits = [n for n in range(2, n_kv_heads + 1) if n_kv_heads % n == 0]
    fix = f"pass --ranks {fits[0]} (a number of ranks that divides {n_kv_heads})" if fits else \
        "bench it with --distributed pipeline if mlx-lm's model has pipeline()"
    return (f"{name}: its {n_kv_heads} KV heads do not split over {ranks} ranks (--ranks {ranks}); {fix}, or omit "
            "-m to bench the generated llama with 4 KV heads")


def no_shard_message(name: str, family: str, has_pipeline: bool) -> str:
    """The refusal of a model whose mlx-lm class has no `shard()`, recommending only what runs distributed: the
    tested tensor-split families, and `--distributed pipeline` when this model has `pipeline()`."""
    pipeline = f"; or run it with --distributed pipeline (mlx-lm's {family} model has pipeline())" if has_pipeline \
        else ""
    return (f"{name}: mlx-lm's {family} model has no shard() (tensor parallelism), so it cannot run with "
            f"--distributed (distributed=True); run it on one machine, or pick a model of a family that runs "
            f"distributed (tested: {', '.join(TENSOR_FAMILIES)}){pipeline}")


# Families whose tensor split tests/test_distributed.py checks against one process (MLA families such as
# deepseek_v3 have shard() but are refused: their compressed K/V is not split by heads).
TENSOR_FAMILIES = ("llama", "qwen3", "qwen3_moe", "qwen3_5")


def _kv_heads(mcfg: dict) -> int | None:
    for key in ("num_key_value_heads", "num_attention_heads"):
        if isinstance(mcfg.get(key), int):
            return mcfg[key]
    return None
