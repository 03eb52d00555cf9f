"""Load a model: the bundled GGUF, any GGUF file, or an mlx-lm model directory / repo id."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .. import paths, sysinfo
from ..errors import ModelLoadError
from ..storage.atomic import atomic_write
from .gguf import build_model_from_gguf, read_gguf
from .layer_plan import LayerPlan
from .paged import attach
from .tokenizer import Tokenizer, tokenizer_from_gguf_metadata

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedModel:
    """A ready model: the mlx-lm module plus everything the engine needs to know about it."""

    model: nn.Module
    tokenizer: Tokenizer
    name: str
    path: Path
    family: str  # mlx-lm's model_type
    fingerprint: str
    plan: LayerPlan  # each cache slot's kind and geometry (models/layer_plan.py)
    n_layers: int  # paged attention slots (the KV pool's layers)
    n_kv_heads: int
    head_dim: int
    max_context: int
    dtype: mx.Dtype
    weights_format: str
    weight_bytes: int


def _classes(model_type: str):
    from mlx_lm.utils import _get_classes

    return _get_classes({"model_type": model_type})


def resolve_model_path(spec: str | None) -> Path:
    """Turns a model argument into a local path, with errors that say how to fix it."""
    if spec is None:
        p = paths.default_model_path()
        if p is None:
            raise ModelLoadError(f"the default model is not installed; install it with: {paths.DEFAULT_MODEL_HINT}")
        return p
    p = Path(spec).expanduser()
    if p.exists():
        return p
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        try:
            from mlx_lm.utils import _download

            return Path(_download(spec))
        except Exception as e:
            raise ModelLoadError(
                f"model {spec!r} is not a local path and could not be downloaded ({type(e).__name__}); "
                "pass a GGUF file or an mlx-lm model directory"
            ) from None
    raise ModelLoadError(f"model path not found: {spec}; pass a GGUF file or an mlx-lm model directory")


def fingerprint(files: list[Path], tokenizer_json: str) -> str:
    """Hash of weights + tokenizer, cached by (path, size, mtime) in the cache dir (hashing GBs is slow)."""
    key = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    tok_hash = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    cache_file = paths.cache_dir() / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    weights_hash = cache.get(key)
    if not isinstance(weights_hash, str):
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        weights_hash = h.hexdigest()
        cache[key] = weights_hash
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(cache_file) as f:
                f.write(json.dumps(cache).encode())
        except OSError:
            pass  # a cache; failing to write it only costs time next load
    return hashlib.sha256(f"{weights_hash}:{tok_hash}".encode()).hexdigest()[:32]


def _param_count(model: nn.Module) -> int:
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            n += m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
    for k, v in nn.utils.tree_flatten(model.parameters()):
        if not k.endswith((".scales", ".biases")) and v.dtype != mx.uint32:
            n += v.size
    return n


def _dequantize(model: nn.Module, dtype: mx.Dtype) -> None:
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    model.set_dtype(dtype)


def _nbytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in nn.utils.tree_flatten(model.parameters()))


def choose_weights(model: nn.Module, weights_dtype: str) -> str:
    """Applies the weights policy (design.md §10) and returns the format in use.

    "auto": on the CPU backend dequantize to float32 when that takes at most 3/8 of the machine's memory
    (CPU quantized_matmul is slow); on Metal keep the weights as stored. The choice depends on the machine,
    not on how much memory happens to be free at load time, so the same model gives the same numbers in every
    process (a quantized and a dequantized model differ in rounding, ~1e-5 in logits). Only when float32 would
    not fit in the memory available right now does it keep them quantized, with a warning.
    """
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    if weights_dtype == "auto":
        weights_dtype = auto_weights_dtype(_param_count(model) * 4)
    if weights_dtype == "quantized":
        return "quantized" if quantized else str(next(iter(_float_dtypes(model)), "float16"))
    dt = getattr(mx, weights_dtype)
    _dequantize(model, dt)
    return weights_dtype


def auto_weights_dtype(float32_bytes: int) -> str:
    """The "auto" weights format: "float32" or "quantized" (keep as stored).

    Args:
        float32_bytes: size of the weights dequantized to float32, in bytes.
    """
    if sysinfo.backend() != "cpu" or float32_bytes > 0.375 * sysinfo.total_memory():
        return "quantized"
    if float32_bytes > 0.9 * sysinfo.available_memory():
        log.warning("keeping the weights quantized: float32 weights (%.1f GB) do not fit in the memory free now; "
                    "outputs differ slightly from a float32 run (set weights_dtype to choose)", float32_bytes / 1e9)
        return "quantized"
    return "float32"


def _float_dtypes(model):
    return {str(v.dtype).split(".")[-1] for _, v in nn.utils.tree_flatten(model.parameters()) if v.dtype != mx.uint32}


def _max_context(cfg: dict) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    text = cfg.get("text_config")
    return _max_context(text) if isinstance(text, dict) else 4096


def load_model(spec: str | None = None, weights_dtype: str = "auto") -> LoadedModel:
    """Loads a model and its tokenizer.

    Args:
        spec: None (the bundled default), a .gguf file, or an mlx-lm model directory / repo id.
        weights_dtype: "auto", "float32", "float16", "bfloat16" or "quantized" (keep as stored).
    Returns:
        A LoadedModel. Raises ModelLoadError with the path and the fix on any failure.
    """
    path = resolve_model_path(spec)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is not a .gguf file; pass a GGUF file or an mlx-lm model directory")
        weights, meta = read_gguf(path)
        model, cfg = build_model_from_gguf(path, weights, meta, _classes)
        del weights
        try:
            tokenizer = tokenizer_from_gguf_metadata(meta)
        except ValueError as e:
            raise ModelLoadError(f"{path.name}: {e}") from None
        files = [path]
        name = str(meta.get("general.name") or path.stem)
    elif path.is_dir():
        model, cfg, tokenizer, files = _load_mlx_dir(path)
        name = path.name
    else:
        raise ModelLoadError(f"model path not found: {path}")
    fmt = choose_weights(model, weights_dtype)
    mx.eval(model.parameters())
    plan = attach(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        path=path,
        family=str(cfg["model_type"]),
        fingerprint=fingerprint(files, tokenizer.to_json()),
        plan=plan,
        n_layers=len(plan.paged_slots),
        n_kv_heads=plan.n_kv_heads,
        head_dim=plan.head_dim,
        max_context=_max_context(cfg),
        dtype=plan.kv_dtype,
        weights_format=fmt,
        weight_bytes=_nbytes(model),
    )


def _load_mlx_dir(path: Path, lazy: bool = False):
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} has no config.json; pass a GGUF file or an mlx-lm model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise ModelLoadError(f"{cfg_file} has no model_type; pass a GGUF file or an mlx-lm model directory")
    try:
        _classes(mt)
    except Exception:  # noqa: BLE001 -- mlx-lm raises ValueError; a broken model module anything
        import mlx_lm

        raise ModelLoadError(f"architecture {mt!r} ({cfg_file}) is not in the installed mlx-lm {mlx_lm.__version__}; "
                             "upgrade mlx-lm (pip install -U mlx-lm) or pass another model") from None
    from mlx_lm.utils import load_model as mlx_load_model

    try:
        model, cfg = mlx_load_model(path, lazy=lazy)
    except Exception as e:
        raise ModelLoadError(f"cannot load the mlx-lm {mt} model in {path}: {e}") from None
    try:
        tokenizer = Tokenizer.load(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {e}") from None
    files = sorted(path.glob("model*.safetensors"))
    return model, cfg, tokenizer, files
