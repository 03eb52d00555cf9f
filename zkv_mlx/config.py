"""Engine configuration: one dataclass tree, validated on construction (design.md, Configuration).

Sources, later wins: defaults < TOML file < CLI flags / API kwargs.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .kv_presets import KV_PRESETS

from .sizes import parse_size  # noqa: F401  (re-exported: callers import it from here)

KV_DTYPES = ("auto", "float16", "bfloat16", "float32")
KV_QUANTS = ("none", *KV_PRESETS)
KEY_LAYOUTS = ("auto", "channel", "token")


@dataclass(slots=True)
class KVCacheConfig:
    """Paged KV pool settings.

    block_size: tokens per block ("auto": 16, or 32 with per-channel keys). memory: bytes, a size string, or
    "dynamic" (a fraction of the memory left after the weights). dtype: "auto" = the model's activation dtype.
    quant: "none" | "int8" | "int4" | "int4-f16" | "k8v4" (kv_presets.py: K and V bits, value group, key metadata;
    "int4-f16" is int4 as before issue #19). group_size: 32 | 64, per-token group along head_dim (default: the
    preset's: 32 for int8 and int4, 64 for int4-f16 and k8v4). key_layout: "auto" (per channel for 4-bit keys) | "channel" | "token" (kernels/kv_quant.py).
    sinks: with per-channel keys, keys of each sequence's first `sinks` positions stay in full precision.
    """

    block_size: int | str = "auto"
    memory: int | str = "dynamic"
    dtype: str = "auto"
    dynamic_fraction: float = 0.3
    quant: str = "none"
    group_size: int | None = None
    key_layout: str = "auto"
    sinks: int = 4

    def __post_init__(self):
        if self.quant not in KV_QUANTS:
            raise ConfigError(f"kv.quant: {self.quant!r} is not one of {', '.join(KV_QUANTS)}")
        if self.group_size is not None and self.group_size not in (32, 64):
            raise ConfigError(f"kv.group_size: {self.group_size!r} is not supported; use 32 or 64")
        if self.key_layout not in KEY_LAYOUTS:
            raise ConfigError(f"kv.key_layout: {self.key_layout!r} is not one of {', '.join(KEY_LAYOUTS)}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or not 0 <= self.sinks <= 8:
            raise ConfigError(f"kv.sinks: {self.sinks!r} must be an integer in 0..8")
        if self.block_size == "auto":
            self.block_size = KV_PRESETS[self.quant].key_block if self.channel_keys else 16
        if not isinstance(self.block_size, int) or self.block_size not in (8, 16, 32, 64, 128):
            raise ConfigError(f"kv.block_size: {self.block_size!r} is not supported; use 8, 16, 32, 64 or 128")
        if isinstance(self.memory, str) and self.memory.strip().lower() == "dynamic":
            self.memory = "dynamic"
        else:
            self.memory = parse_size(self.memory, "kv_cache_memory")
        if self.dtype not in KV_DTYPES:
            raise ConfigError(f"kv.dtype: {self.dtype!r} is not one of {', '.join(KV_DTYPES)}")
        if not (0.0 < float(self.dynamic_fraction) <= 0.9):
            raise ConfigError(f"kv.dynamic_fraction: {self.dynamic_fraction!r} must be in (0, 0.9]")

    @property
    def channel_keys(self) -> bool:
        """Keys quantized per channel over a full block (the default for 4-bit keys)."""
        if self.quant == "none" or self.key_layout == "token":
            return False
        return self.key_layout == "channel" or KV_PRESETS[self.quant].channel_default


@dataclass(slots=True)
class PrefixSpec:
    """A prompt prefix to cache: `preload` computes it at start and pins it; `shared` makes its blocks public."""

    name: str
    content: str
    preload: bool = False
    shared: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("prompt_cache.prefixes: every prefix needs a non-empty 'name'")
        if not isinstance(self.content, str) or not self.content:
            raise ConfigError(f"prompt_cache.prefixes[{self.name!r}]: 'content' must be non-empty text")


@dataclass(slots=True)
class PromptCacheConfig:
    """Automatic prefix caching.

    size: bytes of unreferenced cached blocks kept (None: as many as the pool has room for).
    ttl: seconds an unreferenced cached block is kept (None: no expiry).
    """

    enabled: bool = True
    size: int | str | None = None
    ttl: float | None = None
    prefixes: list = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"prompt_cache.enabled: expected true or false, got {self.enabled!r}")
        if self.size is not None:
            self.size = parse_size(self.size, "prompt_cache.size")
        if self.ttl is not None and (isinstance(self.ttl, bool) or not isinstance(self.ttl, (int, float))
                                     or self.ttl <= 0):
            raise ConfigError(f"prompt_cache.ttl: {self.ttl!r} must be a positive number of seconds")
        if not isinstance(self.prefixes, list):
            raise ConfigError("prompt_cache.prefixes: expected a list of {name, content, preload, shared}")
        specs = []
        for p in self.prefixes:
            if isinstance(p, PrefixSpec):
                specs.append(p)
            elif isinstance(p, dict):
                specs.append(_build(PrefixSpec, p, "prompt_cache.prefixes."))
            else:
                raise ConfigError(f"prompt_cache.prefixes: expected tables, got {p!r}")
        names = [p.name for p in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"prompt_cache.prefixes: duplicate names in {names}")
        self.prefixes = specs


@dataclass(slots=True)
class TierConfig:
    """The SSD tier under the prompt cache.

    ssd: on/off. dir: where block files go (default: <cache dir>/kv-blocks). size: byte budget, or "auto"
    (10% of the free disk, between 256 MiB and 64 GiB).
    """

    ssd: bool = True
    dir: str | None = None
    size: int | str = "auto"

    def __post_init__(self):
        if isinstance(self.ssd, str):
            if self.ssd.lower() not in ("on", "off", "true", "false"):
                raise ConfigError(f"ssd_cache: {self.ssd!r} must be on or off")
            self.ssd = self.ssd.lower() in ("on", "true")
        if not isinstance(self.ssd, bool):
            raise ConfigError(f"ssd_cache: {self.ssd!r} must be on or off")
        if not (isinstance(self.size, str) and self.size.strip().lower() == "auto"):
            self.size = parse_size(self.size, "ssd_cache_size")
        else:
            self.size = "auto"


KV_POLICIES = ("full", "window", "h2o")


@dataclass(slots=True)
class PolicyConfig:
    """Long-context KV policy of each sequence (design.md, long-context policies; cache/policy.py).

    kind: "full" keeps every token; "window" keeps the first `sinks` tokens and the most recent ones
    (StreamingLLM); "h2o" keeps the sinks, a recent window of `recent` tokens (default one block) and the
    blocks with the highest recent attention mass, weighed toward newer blocks. budget: KV tokens a sequence may
    hold (required unless full).
    """

    kind: str = "full"
    budget: int | None = None
    sinks: int = 4
    recent: int | None = None

    def __post_init__(self):
        if self.kind not in KV_POLICIES:
            raise ConfigError(f"kv_policy: {self.kind!r} is not one of {', '.join(KV_POLICIES)}")
        for name in ("budget", "recent"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name}: {v!r} must be a positive number of tokens")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ConfigError(f"sinks: {self.sinks!r} must be an integer >= 0")
        if self.kind != "full" and self.budget is None:
            raise ConfigError(f"kv_policy {self.kind} needs a budget: pass --budget TOKENS (e.g. --budget 512)")


def check_policy(kv: KVCacheConfig, kind, budget=None, sinks=4, recent=None) -> None:
    """Checks a long-context policy against the whole KV configuration, so that each error's suggested fix is
    valid for the rest of it: the budget, at least what the policy needs at this block size (every KV format,
    quantized ones included, takes every policy: storage/key_shift.py).

    Args:
        kv: the KV cache settings. kind, budget, sinks, recent: as `PolicyConfig` (unvalidated values are left
            to `PolicyConfig`).
    Raises:
        ConfigError naming the conflict and a fix that passes this check.
    """
    if kind in (None, "full") or kind not in KV_POLICIES:
        return
    from .cache.policy import KVPolicy

    try:
        need = KVPolicy(kind, 0, kv.block_size, sinks, recent).min_budget
    except TypeError:  # sinks/recent of the wrong type: PolicyConfig names them
        return
    fits = isinstance(budget, int) and not isinstance(budget, bool) and budget >= need
    example = max(need, 512)
    if budget is None:
        raise ConfigError(f"kv_policy {kind} needs a budget: pass --budget TOKENS (e.g. --budget {example})")
    if fits or not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        return  # a bad type or sign: PolicyConfig names it
    KVPolicy.from_config(PolicyConfig(kind, budget, sinks, recent), kv.block_size)  # "use --budget N or more"


WEIGHT_DTYPES = ("auto", "float32", "float16", "bfloat16", "quantized")


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs. model=None means the bundled default model."""

    model: str | None = None
    max_context: int | None = None
    max_num_seqs: int = 16
    prefill_chunk: int = 512
    weights_dtype: str = "auto"
    kv: KVCacheConfig = field(default_factory=KVCacheConfig)
    prompt_cache: PromptCacheConfig = field(default_factory=PromptCacheConfig)
    tiers: TierConfig = field(default_factory=TierConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    distributed: bool = False  # one model sharded over the ranks of an mlx.launch job (zkv_mlx/distributed)
    # how: "tensor" (mlx-lm's shard(): every layer, 1/N of its heads) or "pipeline" (mlx-lm's pipeline(): 1/N of
    # the layers, all their heads)
    distributed_split: str = "tensor"

    def __post_init__(self):
        if not isinstance(self.distributed, bool):
            raise ConfigError(f"distributed: {self.distributed!r} must be true or false")
        if self.distributed_split not in ("tensor", "pipeline"):
            raise ConfigError(f"distributed_split: {self.distributed_split!r} is not one of tensor, pipeline "
                              "(e.g. --distributed pipeline)")
        if isinstance(self.policy, dict):
            self.policy = _build(PolicyConfig, self.policy, "policy.")
        if isinstance(self.tiers, dict):
            self.tiers = _build(TierConfig, self.tiers, "tiers.")
        if isinstance(self.kv, dict):
            self.kv = _build(KVCacheConfig, self.kv, "kv.")
        if isinstance(self.prompt_cache, dict):
            self.prompt_cache = _build(PromptCacheConfig, self.prompt_cache, "prompt_cache.")
        if self.max_context is not None and (not isinstance(self.max_context, int) or self.max_context < 1):
            raise ConfigError(f"max_context: {self.max_context!r} must be a positive integer")
        if not isinstance(self.max_num_seqs, int) or not 1 <= self.max_num_seqs <= 1024:
            raise ConfigError(f"max_num_seqs: {self.max_num_seqs!r} must be an integer in 1..1024")
        if not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 16:
            raise ConfigError(f"prefill_chunk: {self.prefill_chunk!r} must be an integer >= 16")
        if self.weights_dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"weights_dtype: {self.weights_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
        p = self.policy
        check_policy(self.kv, p.kind, p.budget, p.sinks, p.recent)


# Flat API kwargs / CLI spellings -> dotted config keys.
ALIASES = {
    "block_size": "kv.block_size",
    "kv_cache_memory": "kv.memory",
    "kv_cache": "kv.memory",
    "kv_dtype": "kv.dtype",
    "kv_quant": "kv.quant",
    "kv_group_size": "kv.group_size",
    "kv_key_layout": "kv.key_layout",
    "kv_sinks": "kv.sinks",
    "prompt_cache_enabled": "prompt_cache.enabled",
    "prompt_cache_size": "prompt_cache.size",
    "prompt_cache_ttl": "prompt_cache.ttl",
    "prefixes": "prompt_cache.prefixes",
    "ssd_cache": "tiers.ssd",
    "ssd_dir": "tiers.dir",
    "ssd_cache_size": "tiers.size",
    "kv_policy": "policy.kind",
    "budget": "policy.budget",
    "sinks": "policy.sinks",
    "h2o_recent": "policy.recent",
}
_TABLES = ("kv", "prompt_cache", "tiers", "policy")


BLOCK_SIZES = (8, 16, 32, 64, 128)


def _check_block_size(bs, policy: dict) -> None:
    # An unsupported block size: suggest the supported ones that also fit the policy's budget, if any.
    if bs is None or bs == "auto" or bs in BLOCK_SIZES and not isinstance(bs, bool):
        return
    kind, budget = policy.get("kind", "full"), policy.get("budget")
    need = {b: 0 for b in BLOCK_SIZES}  # the least budget each block size allows the policy
    if kind in ("window", "h2o") and isinstance(budget, int):
        from .cache.policy import KVPolicy

        try:
            need = {b: KVPolicy(kind, 0, b, policy.get("sinks", 4), policy.get("recent")).min_budget
                    for b in BLOCK_SIZES}
        except TypeError:
            pass
    ok = [b for b in BLOCK_SIZES if need[b] <= budget] if isinstance(budget, int) else list(BLOCK_SIZES)
    best = 16 if 16 in ok or not ok else ok[-1]
    others = [str(b) for b in ok if b != best]
    raise ConfigError(f"kv.block_size: {bs!r} is not supported; use --block-size {best}"
                      + ("" if ok else f" and pass --budget {need[best]}")
                      + (f" (or {', '.join(others)})" if others else ""))


def _build(cls, values: dict, prefix: str = ""):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(prefix + u for u in unknown)}; "
            f"valid keys: {', '.join(prefix + n for n in sorted(names))}"
        )
    try:
        return cls(**values)
    except TypeError as e:  # wrong shapes of values, e.g. a table where a number belongs
        raise ConfigError(f"bad config: {e}") from None


def load_toml(path: str | Path) -> dict:
    """Reads a TOML config file into a nested dict, with clear errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None


def make_config(toml: dict | None = None, **overrides) -> EngineConfig:
    """Builds an EngineConfig from a TOML dict and flat overrides (None values are ignored).

    Args:
        toml: nested dict from `load_toml` (top-level engine keys plus a [kv] table).
        **overrides: flat keys (`max_context=...`) or aliases (`kv_cache_memory="2GB"`, `block_size=32`).
    Returns:
        A validated EngineConfig.
    """
    merged: dict[str, Any] = {}
    tables: dict[str, dict] = {t: {} for t in _TABLES}
    for k, v in (toml or {}).items():
        if k in _TABLES:
            if not isinstance(v, dict):
                raise ConfigError(f"{k}: expected a table ([{k}]) in the config file")
            tables[k].update(v)
        else:
            merged[k] = v
    for k, v in overrides.items():
        if v is None:
            continue
        key = ALIASES.get(k, k)
        if key == "prompt_cache" and isinstance(v, bool):  # ZKV(prompt_cache=False)
            tables["prompt_cache"]["enabled"] = v
            continue
        table, _, sub = key.partition(".")
        if sub and table in _TABLES:
            tables[table][sub] = v
        elif key in _TABLES:
            raise ConfigError(f"{key}: pass {key} settings as a [{key}] table or flat keys like {key}_size")
        else:
            merged[key] = v
    pol = tables["policy"]
    _check_block_size(tables["kv"].get("block_size"), pol)
    merged["kv"] = _build(KVCacheConfig, tables["kv"], "kv.")
    merged["prompt_cache"] = _build(PromptCacheConfig, tables["prompt_cache"], "prompt_cache.")
    merged["tiers"] = _build(TierConfig, tables["tiers"], "tiers.")
    # before PolicyConfig's own checks, which do not know the KV format
    check_policy(merged["kv"], pol.get("kind", "full"), pol.get("budget"), pol.get("sinks", 4), pol.get("recent"))
    merged["policy"] = _build(PolicyConfig, pol, "policy.")
    return _build(EngineConfig, merged)
