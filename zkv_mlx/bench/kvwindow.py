"""`zkv-mlx bench kvwindow`: KV bytes held for one long conversation on a Gemma-3-like layer plan, with sliding-window
layers in window-sized memory (engine/window_groups.py) vs every layer's rows kept for the whole context (as an
all-global model holds them).

The model is a random-weight mlx-lm `gemma3_text` with Gemma 3 4B's attention geometry (8 query heads, 4 KV heads,
head_dim 256, window 1024, 5 local : 1 global layers) and a small hidden size: the KV bytes depend on the layer plan
and the geometry, not on the weights. Both engines run the same prompt; the bytes are read from the engines' own
statistics (`kv_cache_stats()["groups"]`, blocks in use times bytes per block) after every step, and the peak is
reported. The baseline (`--baseline run`) is the same engine with the window layers in the logical blocks' pool
(window blocks off): its held bytes are what the conversation needs when every layer keeps the whole context.
`--baseline derived` (default: half the time) takes the windowed run's logical blocks in use at its peak times the
bytes of one block over every layer, which is what the run baseline measures (the block bookkeeping is the same).
Result line: {"model", "context", "window", "plan", "windowed": {...}, "all_global": {...}, "saving"}.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from .common import bench_tokens, emit, log, machine

# Gemma 3 4B's attention geometry (config.json of google/gemma-3-4b-it), small hidden and MLP sizes.
GEMMA3_LIKE = dict(model_type="gemma3_text", hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=1024, sliding_window_pattern=6, rms_norm_eps=1e-6, rope_theta=1000000.0,
                   rope_local_base_freq=10000.0, max_position_embeddings=131072)


def write_model(path: Path, tokenizer, cfg: dict = GEMMA3_LIKE, seed: int = 0) -> Path:
    """Writes a random-weight mlx-lm model directory of config `cfg` (vocab of `tokenizer`)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    cfg = dict(cfg, vocab_size=tokenizer.vocab_size)
    model_class, args_class = _get_classes(cfg)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(cfg))
    mx.eval(model.parameters())
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(cfg))
    tokenizer.save(path)
    return path


def held_bytes(engine) -> dict:
    """KV bytes the engine's blocks in use hold, per layer group and in all, and the logical blocks in use."""
    groups = engine.stats()["groups"]
    per = {f"{g['kind']}{'' if g['window'] is None else ' ' + str(g['window'])}": g["used_size"] for g in groups}
    return dict(per, total=sum(per.values()), logical_blocks=groups[0]["blocks_used"])


def measure(path: str, ids: list[int], windowed: bool, chunk: int, kv_dtype: str) -> dict:
    """Runs one request over `ids` (one token generated) and returns the peak bytes held, the bytes still held
    (cached) after it ended, the bytes of one logical block over every layer, and the time taken."""
    from unittest import mock

    from ..config import make_config
    from ..engine import Engine, SamplingParams
    from ..engine import runner, sizing
    from ..models.loader import load_model

    cfg = make_config(model=path, kv_cache_memory="2GB", kv_dtype=kv_dtype, prefill_chunk=chunk,
                      max_context=len(ids) + 16, max_num_seqs=1)
    counts = runner.window_counts if windowed else (lambda plan: {})  # {}: window layers in the logical pool
    with mock.patch.object(runner, "window_counts", counts), mock.patch.object(sizing, "window_counts", counts):
        engine = Engine(load_model(path, cfg.weights_dtype), cfg)
    engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), "local", lambda ev: None)
    peak: dict = {"total": 0}
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
        now = held_bytes(engine)
        if now["total"] > peak["total"]:
            peak = now
    groups = engine.stats()["groups"]
    return {"peak_held_bytes": peak, "cached_after_bytes": sum(g["cached_size"] for g in groups),
            "all_layers_bytes_per_block": sum(g["bytes_per_block"] for g in groups),
            "pool_bytes": engine.stats()["total_size"], "seconds": round(time.perf_counter() - t0, 1)}


def run(args) -> int:
    from ..models.tokenizer import tokenizer_from_gguf_metadata
    from .. import paths

    import mlx.core as mx

    _, meta = mx.load(str(paths.default_model_path()), return_metadata=True)
    tokenizer = tokenizer_from_gguf_metadata(meta)
    ids = bench_tokens(tokenizer, args.context)
    out = {"model": "gemma3_text (random weights, Gemma 3 4B attention geometry)", "context": args.context,
           "window": GEMMA3_LIKE["sliding_window"], "plan": "5 local : 1 global, 6 layers",
           "kv_dtype": args.kv_dtype, "baseline": args.baseline, "machine": machine()}
    with tempfile.TemporaryDirectory() as d:
        path = str(write_model(Path(d) / "gemma3-like", tokenizer))
        runs = (("windowed", True),) + ((("all_global", False),) if args.baseline == "run" else ())
        for name, windowed in runs:
            log(args, f"{name}: {args.context} tokens ...")
            out[name] = measure(path, ids, windowed, args.chunk, args.kv_dtype)
            log(args, f"{name}: peak {out[name]['peak_held_bytes']['total'] / 2**20:.1f} MiB held, "
                      f"{out[name]['seconds']} s")
    w = out["windowed"]
    if args.baseline == "run":
        g = out["all_global"]["peak_held_bytes"]["total"]
    else:
        # the same logical blocks with every layer's rows in each (what the "run" baseline measures)
        g = w["peak_held_bytes"]["logical_blocks"] * w["all_layers_bytes_per_block"]
        out["all_global"] = {"peak_held_bytes": {"total": g}}
    out["saving"] = round(1 - w["peak_held_bytes"]["total"] / g, 4)
    log(args, f"window-sized memory holds {100 * out['saving']:.1f}% less KV")
    emit(out)
    return 0
