"""The engine: step() = schedule -> run model -> sample -> postprocess (design.md §8).

Each concern lives in its own room, built here and wired together by passing what each needs:
cache/prefix_cache.py (hash roots, prefixes, counters), engine/tiers.py (SSD spill and promote),
engine/sessions.py (session pins, imports), engine/requests.py (validation), engine/drop.py (long-context
policies), engine/output.py (stop checks and events). engine/thread.py runs it on its own thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..cache import BlockManager
from ..cache.hashing import HashKey
from ..cache.policy import KVPolicy
from ..cache.prefix_cache import PrefixCache
from ..config import EngineConfig, PolicyConfig, check_policy
from ..errors import ConfigError, ZkvError
from ..models.loader import LoadedModel
from . import drop
from .output import Event, Outputs
from .requests import check_prompt
from .runner import ModelRunner
from .sampler import sample, sample_lazy
from .scheduler import Scheduler
from .sequence import SamplingParams, Sequence
from . import sessions
from .sessions import ResidentSessions
from .sizing import plan_pool
from .snapshots import StateSnapshots
from .stats import block_map, engine_stats
from .tiers import TierStore, open_ssd
from .window_bytes import GroupedBlockBytes

__all__ = ["Engine", "Event", "InFlight"]


@dataclass(slots=True)
class InFlight:
    """A decode step sampled lazily and still computing: its tokens are read and postprocessed one step later.

    Each of its sequences counts the token in `num_inflight` until then (mlx-lm's generate_step keeps it in a
    variable the same way).
    """

    seqs: list[Sequence]
    tokens: mx.array  # [B] int32, lazy
    mass: list | None  # h2o: attention mass per block of each sequence (lazy), folded in when resolved


class Engine:
    """Synchronous core. Not thread-safe: use EngineThread from other threads."""

    def __init__(self, lm: LoadedModel, cfg: EngineConfig, make_runner=ModelRunner):
        self.lm = lm
        self.cfg = cfg
        self.max_context = cfg.max_context or lm.max_context
        num_blocks, kv_dtype, window_blocks = plan_pool(cfg, lm, self.max_context)
        # make_runner: distributed runs pass rank 0's runner (zkv_mlx/distributed/leader.py)
        self.runner = make_runner(lm, num_blocks, cfg.kv.block_size, kv_dtype, kv=cfg.kv, window_blocks=window_blocks)
        self.kv = self.runner.pool  # the KV arrays (KVPool); block bookkeeping is self.blocks
        self.kv_format = self.kv.format_name
        self.bytes_per_block = self.kv.total_bytes // max(1, self.kv.num_blocks)
        use_ssd = cfg.tiers.ssd and cfg.prompt_cache.enabled and self.kv.n_layers > 0  # no paged layer: no bytes
        # what sessions and the SSD tier export and import: every layer group's rows of a block
        self.kv_bytes = self.kv if self.runner.windows is None else GroupedBlockBytes(
            self.kv, self.runner.windows, [(s.window, s.index) for s in self.runner.plan.paged_slots])
        make_tiers = getattr(self.runner, "make_tiers", None)  # distributed: an SSD store per rank (its heads)
        self.tiers = make_tiers(cfg.tiers, lm.fingerprint, use_ssd) if make_tiers is not None else TierStore(
            self.kv_bytes, open_ssd(cfg.tiers, self.kv_bytes, lm.fingerprint) if use_ssd else None)
        self.blocks = BlockManager(num_blocks, cfg.kv.block_size, self.tiers if use_ssd else None)
        if self.runner.windows is not None:  # sliding-window groups: their own blocks, prefix hits capped to them
            self.runner.windows.bind(self.blocks)
        self.prefix = PrefixCache(cfg.prompt_cache, lm.fingerprint, self.kv_format, lm.tokenizer,
                                  self.bytes_per_block)
        self.sessions = ResidentSessions(self.blocks, self.kv_bytes, self.prefix.hash_key)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.prefill_chunk, self.prefix, self.sessions)
        self.out = Outputs(set(lm.tokenizer.eos_token_ids), self.scheduler.finish, self._register)
        if self.runner.windows is None and not self.runner.plan.has_state and hasattr(self.runner, "copy_block"):
            self.scheduler.extend_hit = self._hit_last_block
        self._inflight: InFlight | None = None
        self.snapshots = None
        if self.runner.snapshots_ok:
            # hybrid models: state snapshots beside the blocks, capped at a quarter of the KV budget
            cap = max(64 << 20, num_blocks * self.bytes_per_block // 4)
            make = getattr(self.runner, "make_snapshots", StateSnapshots)  # distributed: every rank keeps its own
            self.snapshots = self.runner.snapshots = make(cap, cfg.kv.block_size)
            self.blocks.hit_limits.append(self.snapshots.limit)
            self.scheduler.align_chunks = True
        self.policy_dropped_blocks = 0
        self.default_policy = self.make_policy(cfg.policy)

    # -- rooms' state, under the names the API, bench and eval read --------------------------------------
    ssd = property(lambda self: self.tiers.ssd)
    counters = property(lambda self: self.prefix.counters)
    per_user = property(lambda self: self.prefix.per_user)
    session_pins = property(lambda self: self.sessions.pins)
    sessions_released = property(lambda self: self.sessions.released)

    def make_policy(self, cfg: PolicyConfig | None) -> KVPolicy | None:
        """A request's policy from its config (None: keep every token); checks it fits this engine."""
        if cfg is not None:
            check_policy(self.cfg.kv, cfg.kind, cfg.budget, cfg.sinks, cfg.recent)  # the KV format first
            if cfg.kind != "full" and not self.runner.shifts_keys:
                raise ConfigError(f"kv_policy {cfg.kind!r} (--kv-policy): {self.lm.family} has "
                                  f"{self.runner.policy_blocker()}, which the long-context policies do not handle "
                                  "yet; run it without a policy (kv_policy='full', --kv-policy full)")
        return KVPolicy.from_config(cfg, self.cfg.kv.block_size)

    def hash_key(self, user: str, prompt_ids: list[int]) -> HashKey | None:
        """The hash salts of a request (see PrefixCache.hash_key)."""
        return self.prefix.hash_key(user, prompt_ids)

    def preload_prefixes(self) -> None:
        """Computes the prefixes marked `preload` and pins their blocks (never evicted)."""
        for entry in self.prefix.to_preload():
            seq = self.add_request(entry.ids, SamplingParams(max_tokens=1, temperature=0.0), "local",
                                   lambda ev: None)
            while not seq.is_finished:
                self.step()
            self._resolve()
            entry.pinned_blocks = self.sessions.full_blocks("local", entry.ids)
            self.blocks.hold(entry.pinned_blocks)  # the pin is a reference that is never dropped

    def _hit_last_block(self, seq: Sequence, hit: int) -> int:
        """A prompt of whole blocks that are all cached: only its last token is computed (a 1-token step
        instead of a block_size-token one: the first token after a prefix hit or a session restore).

        The prefix cache never hands out the block of the last token (its logits must be computed), so that
        block's K/V are copied from the cached one into the sequence's own new block, and the last row is
        written again by the 1-token prefill (the cached block itself is never written). Models with state
        layers or sliding-window groups (their own blocks and snapshots) and sequences under a long-context
        policy keep the block-sized recompute.

        Returns:
            The prompt tokens whose K/V are now in place (`hit`, or num_tokens - 1).
        """
        bs, n = self.blocks.block_size, seq.num_tokens
        if (n % bs or hit != n - bs or seq.policy is not None or seq.dropped
                or getattr(seq, "max_hit_tokens", None) is not None or len(seq.block_table) < n // bs):
            return hit
        src = self.blocks.cached_block(seq, n // bs - 1)
        if src is None:
            return hit
        self.runner.copy_block(src.block_id, seq.block_table[n // bs - 1])
        return n - 1

    def _capture(self, seq: Sequence) -> None:
        if self.snapshots is not None:
            self.snapshots.capture(seq)

    def _register(self, seq: Sequence) -> None:
        if seq.dropped:  # blocks computed after a drop depend on a shortened context: never published
            return
        known = min(seq.num_computed, len(seq.prompt_ids) + len(seq.output_ids))  # len(all_ids), no list copy
        # most decode steps fill no block: skip the lookup (it copies the whole id list: work growing with context)
        if min(known // self.blocks.block_size, len(seq.block_table)) > seq.num_registered:
            self.blocks.register_full_blocks(seq, known)
        if self.snapshots is not None:
            self.snapshots.publish(seq)

    # -- sessions and tiers (engine/sessions.py, engine/tiers.py) ---------------------------------------
    def full_blocks(self, user: str, token_ids: list[int]) -> list[int]:
        return self.sessions.full_blocks(user, token_ids)

    def set_pins(self, key, block_ids: list[int]) -> None:
        self.sessions.set_pins(key, block_ids)

    def drop_pins(self, key) -> None:
        self.sessions.drop_pins(key)

    def import_kv(self, user: str, token_ids: list[int], ks: list, vs: list) -> list[int]:
        return self.sessions.import_kv(user, token_ids, ks, vs)

    def export_state(self, user: str, token_ids: list[int], n_blocks: int):
        """Hybrid models: (arrays, dtypes) of the state after `n_blocks` blocks of `token_ids`, or None."""
        return sessions.export_state(self.snapshots, sessions.block_hashes(self.blocks, self.hash_key, user,
                                                                           token_ids, n_blocks))

    def import_state(self, user: str, token_ids: list[int], n_blocks: int, arrays: list, dtypes: list) -> None:
        sessions.import_state(self.snapshots, sessions.block_hashes(self.blocks, self.hash_key, user, token_ids,
                                                                    n_blocks), arrays, dtypes)

    def export_kv(self, block_ids: list[int]) -> tuple[list, list]:
        return self.tiers.export(block_ids)

    def close_tiers(self) -> None:
        """Spills every cached block not yet on SSD (so the next process finds them) and stops the writer."""
        self.tiers.close(self.blocks.cached_blocks())

    def clear_cache(self, session_key=None) -> int:
        """Forgets unreferenced cached blocks (pinned prefixes stay); returns how many.

        Args:
            session_key: (user, name): release that session's blocks and forget only those.
        """
        if session_key is None:
            return self.blocks.clear_cached()
        return self.sessions.forget(session_key)

    def stats(self) -> dict:
        """KV pool and prefix-cache statistics (see README, "Cache statistics")."""
        return engine_stats(self)

    def block_map(self) -> list[str]:
        """State of every block: free, used, shared (several users of one block), cached, pinned."""
        return block_map(self)

    # -- requests -------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, user: str, listener,
                    policy: PolicyConfig | None = None) -> Sequence:
        """Queues a request; `listener(event)` is called on this thread for every event.

        Args:
            policy: the request's long-context policy (None: the engine's default, `cfg.policy`).
        """
        check_prompt(prompt_ids, self.lm.plan.vocab_size, self.max_context)
        seq = Sequence(prompt_ids=list(prompt_ids), params=params, user=user)
        seq.policy = self.default_policy if policy is None else self.make_policy(policy)
        seq.hash_key = self.hash_key(user, seq.prompt_ids)
        seq.compute_all = self.lm.plan.has_state and self.snapshots is None
        seq.max_total = self.max_context
        seq.detok = self.lm.tokenizer.detokenizer()
        seq.t_submit = time.perf_counter()
        self.scheduler.add(seq)
        self.out.listeners[seq.seq_id] = listener
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stops a request and frees its blocks."""
        if not seq.is_finished:
            self.scheduler.finish(seq, "cancelled")
            self.out.emit_done(seq)

    def fail_all(self, error: Exception) -> None:
        """Ends every request with `error` (after an unexpected failure inside a step)."""
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.out.fail(seq, error)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def next_token_logits(self, prompt_ids: list[int], user: str = "local"):
        """Logits [vocab] (float32 numpy) for the token after `prompt_ids`, through the normal cached path.

        For evaluation and tests: runs when the engine is otherwise idle.
        """
        if self.has_work():
            raise ZkvError("next_token_logits needs an idle engine")
        seq = self.add_request(prompt_ids, SamplingParams(max_tokens=1, temperature=0.0), user, lambda ev: None)
        logits = None
        while logits is None:
            batch = self.scheduler.schedule()
            self.tiers.flush_staged()
            for s, start, end in batch.prefill:
                out = self.runner.prefill(s, start, end)
                mx.eval(out)
                s.num_computed = end
                self._capture(s)
                self._register(s)
                if end == s.prefill_len:
                    logits = np.array(out.astype(mx.float32))
        self.scheduler.finish(seq, "stop")
        self.out.listeners.pop(seq.seq_id, None)
        return logits

    # -- one step -------------------------------------------------------------------------------------
    def step(self) -> int:
        """Runs one engine step; returns the number of tokens sampled.

        Decode is pipelined (as mlx-lm's generate_step): the step's tokens are sampled lazily and evaluated
        asynchronously while the next step's graph is built from them; they are postprocessed one step later
        (`InFlight`).
        """
        self.prefix.trim(self.blocks)
        self._apply_policies()
        batch = self.scheduler.schedule()
        self.tiers.flush_staged()  # SSD promotions land before the forward reads them
        for seq in batch.finished:
            self.out.emit_done(seq)
        sampled = self._resolve() if batch.prefill else 0
        for seq, start, end in batch.prefill:
            if not seq.is_finished:  # else its in-flight token just ended it
                sampled += self._prefill(seq, start, end)
        return sampled + self._decode([s for s in batch.decode if not s.is_finished])

    def _apply_policies(self) -> None:
        running = [s for s in self.scheduler.running if s.policy is not None]
        # h2o ranks blocks by attention mass: before it drops any, take the in-flight step's mass (only then, so
        # decode stays pipelined on the steps that drop nothing: block_size - 1 of every block_size)
        chunk = self.cfg.prefill_chunk
        if self._inflight is not None and any(s.policy.kind == "h2o" and drop.will_drop(s, chunk) for s in running):
            self._resolve()
        self.policy_dropped_blocks += drop.apply(running, chunk, self.runner, self.blocks)

    def _prefill(self, seq: Sequence, start: int, end: int) -> int:
        """Runs one prefill chunk; the last one samples the first token. Returns the tokens sampled (0 or 1)."""
        logits = self.runner.prefill(seq, start, end)
        mass = self.runner.mass
        last = end == seq.prefill_len
        if last:
            token = sample(logits[None], [seq])[0]
        else:
            mx.eval(logits)  # runs the chunk; its K/V are what the next chunk attends to
        seq.num_computed = end
        self._capture(seq)
        drop.add_mass(seq, mass and mass[0], end - start)
        if last:
            self.out.postprocess(seq, token)
        else:
            self._register(seq)
        return int(last)

    def _decode(self, seqs: list[Sequence]) -> int:
        """One batched decode step; lazily sampled tokens stay in flight until the next step reads them."""
        if not seqs:
            return self._resolve()
        prev = self._inflight
        chained = prev is not None and prev.seqs == seqs
        sampled = 0
        if not chained:
            sampled += self._resolve()
            seqs = [s for s in seqs if not s.is_finished]
            if not seqs:
                return sampled
        logits = self.runner.decode(seqs, prev.tokens if chained else None)
        mass = self.runner.mass  # h2o sequences: attention mass per block (folded in when the step resolves)
        # the repetition penalty counts the in-flight tokens as each history's newest (sampler._penalize)
        tokens = sample_lazy(logits, seqs, prev.tokens if chained else None)
        mx.async_eval(tokens, *[m for m in (mass or []) if m is not None])
        for seq in seqs:
            seq.num_inflight += 1
            seq.num_computed += 1
            self._capture(seq)
        if chained:
            sampled += self._resolve()  # the previous step's tokens, computed while this graph was built
        self._inflight = InFlight(seqs, tokens, mass)
        return sampled

    def _resolve(self) -> int:
        """Postprocesses the in-flight decode step, if any (waits for its tokens)."""
        if self._inflight is None:
            return 0
        f, self._inflight = self._inflight, None
        for j, (seq, token) in enumerate(zip(f.seqs, f.tokens.tolist())):
            if seq.is_finished:
                continue  # finished while this step was in flight: its speculative token is dropped
            drop.add_mass(seq, f.mass and f.mass[j], 1)
            seq.num_inflight -= 1
            self.out.postprocess(seq, token)
        return len(f.seqs)
