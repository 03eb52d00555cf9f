"""What every engine-backed command shares: the engine and sampling flags, and opening a model from them.

The commands (`zkv_mlx/commands/`), the plain chat loop, the server and the benchmarks import this module, never
`cli.py`: the command line sits on top and nothing imports it back.
"""

from __future__ import annotations

import argparse

from .kv_presets import KV_PRESETS


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Flags every engine-backed command accepts (also spelled as users know them from the zKV docs)."""
    g = p.add_argument_group("engine")
    g.add_argument("--model", "-m", default=None, help="GGUF file or mlx-lm model directory (default: bundled SmolLM2-135M-Instruct)")
    g.add_argument("--config", default=None, help="TOML config file (unknown keys are errors)")
    g.add_argument("--max-context", type=int, default=None, help="max tokens per sequence (default: the model's)")
    g.add_argument("--kv-cache-memory", "--kv-cache", dest="kv_cache_memory", default=None,
                   help='KV pool size: "4GB", "512MiB", bytes, or "dynamic" (default)')
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 16)")
    g.add_argument("--kv-dtype", default=None, choices=["auto", "float16", "bfloat16", "float32"])
    g.add_argument("--kv-quant", default=None, choices=["none", *KV_PRESETS],
                   help="quantized KV cache: K and V bits (int4 keeps keys per channel with 8-bit metadata; int4-f16 is "
                        "int4 before issue #19, for its session files; see docs/benchmarks.md)")
    g.add_argument("--kv-group-size", type=int, default=None, choices=[32, 64],
                   help="quantization group along head_dim (default 32; int4-f16 and k8v4: 64)")
    g.add_argument("--weights-dtype", default=None, choices=["auto", "float32", "float16", "bfloat16", "quantized"],
                   help="auto: float32 on the CPU backend when memory allows, as stored on Metal")
    g.add_argument("--max-num-seqs", type=int, default=None, help="sequences decoded together at most")
    g.add_argument("--paged-attention", action="store_true", help="accepted for compatibility: paging is always on")
    g.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false", default=None,
                   help="turn automatic prefix caching off")
    g.add_argument("--prompt-cache-size", default=None, help='bytes of idle cached prefixes kept, e.g. "1GB"')
    g.add_argument("--prompt-cache-ttl", type=float, default=None, help="seconds an idle cached prefix is kept")
    g.add_argument("--ssd-cache", default=None, choices=["on", "off"], help="spill idle cached blocks to disk")
    g.add_argument("--ssd-dir", default=None, help="where SSD-tier block files go (default: the cache dir)")
    g.add_argument("--ssd-cache-size", default=None, help='SSD tier budget, e.g. "8GB" (default: 10%% of free disk)')
    g.add_argument("--distributed", nargs="?", const="tensor", default=None, choices=["tensor", "pipeline"],
                   help="shard the model and its KV over the ranks of an mlx.launch job: tensor (default: each rank "
                        "1/N of every layer's heads) or pipeline (each rank 1/N of the layers) (docs/distributed.md)")
    add_policy_flags(g)


def add_policy_flags(g) -> None:
    g.add_argument("--kv-policy", default=None, choices=["full", "window", "h2o"],
                   help="long-context policy: keep every token (full), sinks + recent tokens (window, StreamingLLM) "
                        "or sinks + recent + heavy-hitter blocks (h2o)")
    g.add_argument("--budget", type=int, default=None, help="KV tokens a sequence keeps under window/h2o")
    g.add_argument("--sinks", type=int, default=None, help="leading tokens always kept under window/h2o (default 4)")
    g.add_argument("--h2o-recent", type=int, default=None, help="h2o: recent tokens always kept (default one block)")


def engine_kwargs(args) -> dict:
    return {
        "max_context": args.max_context,
        "kv_cache_memory": args.kv_cache_memory,
        "block_size": args.block_size,
        "kv_dtype": args.kv_dtype,
        "kv_quant": args.kv_quant,
        "kv_group_size": args.kv_group_size,
        "weights_dtype": args.weights_dtype,
        "max_num_seqs": args.max_num_seqs,
        "prompt_cache": args.prompt_cache,
        "prompt_cache_size": args.prompt_cache_size,
        "prompt_cache_ttl": args.prompt_cache_ttl,
        "ssd_cache": args.ssd_cache,
        "ssd_dir": args.ssd_dir,
        "ssd_cache_size": args.ssd_cache_size,
        "kv_policy": args.kv_policy,
        "budget": args.budget,
        "sinks": args.sinks,
        "h2o_recent": args.h2o_recent,
        "distributed": None if getattr(args, "distributed", None) is None else True,
        "distributed_split": getattr(args, "distributed", None),
    }


def open_model(args):
    """Builds a ZKV from the parsed engine flags."""
    from .api import ZKV

    return ZKV(args.model, config=args.config, **engine_kwargs(args))


def add_sampling_flags(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_kwargs(args) -> dict:
    return {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "min_p": args.min_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed, "stop": args.stop,
    }
