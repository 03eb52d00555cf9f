"""A request being generated: its tokens, sampling settings, block table and progress."""

from __future__ import annotations

import itertools
import math
import numbers
import operator
from dataclasses import dataclass, field
from enum import Enum, auto

from ..errors import ConfigError


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 = greedy (so is any temperature below 1e-5).

    Every field is checked here, in the caller's thread, so bad values fail with a ConfigError naming the value
    and its valid range before the request reaches the engine (the server maps it to HTTP 400).
    """

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        self.stop = _stops(self.stop)
        # max_tokens and top_k may be huge: generation still ends at the max context, top-k >= vocab is off.
        self.max_tokens = _integer("max_tokens", self.max_tokens, 1, None, "an integer >= 1")
        self.temperature = _real("temperature", self.temperature, 0.0, 100.0, "a number in [0, 100] (0 = greedy)")
        self.top_p = _real("top_p", self.top_p, 0.0, 1.0, "a number in (0, 1] (1 = off)", lo_open=True)
        self.top_k = _integer("top_k", self.top_k, 0, None, "an integer >= 0 (0 = off)")
        self.min_p = _real("min_p", self.min_p, 0.0, 1.0, "a number in [0, 1) (0 = off)", hi_open=True)
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty, 0.0, 100.0,
                                        "a number in (0, 100] (1 = off)", lo_open=True)
        self.repetition_context = _integer("repetition_context", self.repetition_context, 0, None,
                                           "an integer >= 0 (0 = off)")
        if self.seed is not None:
            # mx.random.key takes an unsigned 64-bit seed
            self.seed = _integer("seed", self.seed, 0, 2**64 - 1, "an integer in [0, 2**64) (e.g. seed % 2**64)")
        if not isinstance(self.ignore_eos, bool):
            raise ConfigError(f"ignore_eos: {self.ignore_eos!r} must be True or False")


def _integer(name: str, value, lo: int, hi: int | None, want: str) -> int:
    """`value` as a Python int (numpy integers too; not bools or floats); ConfigError outside [lo, hi]."""
    try:
        v = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        v = None
    if v is None or v < lo or (hi is not None and v > hi):
        raise ConfigError(f"{name}: {value!r} must be {want}")
    return v


def _real(name: str, value, lo: float, hi: float, want: str, lo_open: bool = False, hi_open: bool = False) -> float:
    """`value` as a finite float in the range; NaN, inf, strings and bools are ConfigErrors."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    v = float(value) if ok else math.nan
    if not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
        raise ConfigError(f"{name}: {value!r} must be {want}")
    return v


def _stops(stop) -> tuple[str, ...]:
    """A stop string or a list/tuple of them, without empty ones."""
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise ConfigError(f"stop: {stop!r} must be a string or a list of strings")
    return tuple(s for s in items if s)


class SeqStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """Prompt + generated tokens. `num_computed` tokens have their K/V in the pool."""

    prompt_ids: list[int]
    params: SamplingParams
    user: str = "local"
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)  # generated tokens whose values are known
    # decode tokens sampled but not read back yet (pipelined decode, engine.InFlight): they follow output_ids
    num_inflight: int = 0
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    prefill_len: int = 0  # tokens to prefill when admitted (prompt, or prompt + output after preemption)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    error: Exception | None = None
    max_total: int = 0  # max_context: prompt + output never exceed it
    rng: object = None  # mx.random key, created on first sampled token
    detok: object = None  # StreamDetokenizer
    emitted: int = 0  # characters of output text already sent
    t_submit: float = 0.0
    t_first: float | None = None
    # prefix caching (see cache/block_manager.py)
    hash_key: object = None  # cache.hashing.HashKey, or None when prefix caching is off
    block_hashes: list = field(default_factory=list)
    num_registered: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the cache at first admission
    # long-context policy (cache/policy.py, engine/drop.py)
    policy: object = None  # KVPolicy, or None to keep every token
    dropped: int = 0  # tokens a policy dropped from the cache: position p lives at cache index p - dropped
    mass: list = field(default_factory=list)  # h2o: attention mass received, per block-table index
    seen: list = field(default_factory=list)  # h2o: queries that could attend to each table index
    # the model's per-sequence caches of state layers (SSM / linear attention) and unpaged slots (models/paged.py)
    state: list | None = None
    compute_all: bool = False  # the prefix cache may supply nothing (the model's state layers are not in it)
    snapshots_pending: dict = field(default_factory=dict)  # block count -> state copy, until its hash is known

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.num_inflight

    @property
    def num_slots(self) -> int:
        """KV slots the sequence needs for its next computation (block tables cover this many)."""
        if self.policy is None:
            return self.num_tokens
        if self.num_computed < self.prefill_len or self.prefill_len == 0:  # prefill: one chunk at a time
            return min(self.num_tokens, self.num_computed + self.policy.chunk) - self.dropped
        return self.num_tokens - self.dropped

    @property
    def cache_len(self) -> int:
        """Tokens whose K/V the sequence holds in the pool."""
        return self.num_computed - self.dropped

    def reset_cache_state(self) -> None:
        """Forgets dropped blocks (after preemption the sequence is recomputed from scratch)."""
        self.state = None
        self.snapshots_pending.clear()
        self.dropped = 0
        self.mass.clear()
        self.seen.clear()

    @property
    def all_ids(self) -> list[int]:
        """Prompt + generated token ids known so far (without tokens still in flight)."""
        return self.prompt_ids + self.output_ids

    @property
    def max_hit_tokens(self) -> int | None:
        """Leading tokens the prefix cache may supply (None: all), so that a hit gives what a cold run computes.

        A cached block holds K/V computed over the full context. Under h2o a hit also skips the attention mass the
        prompt's queries pay, which ranks the blocks to drop: h2o requests compute their prompt. Under window a
        hit equals a cold run only while the cold run drops nothing, i.e. while the whole sequence fits the budget.
        """
        if self.compute_all:
            return 0
        if self.policy is None:
            return None
        if self.policy.kind == "h2o" or self.num_tokens > self.policy.budget:
            return 0
        return None

    @property
    def in_prefill(self) -> bool:
        # prefill ends by sampling a token; from then on each decode step computes the last token's K/V
        return self.num_computed < self.prefill_len

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
