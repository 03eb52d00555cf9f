"""The engine: step() = schedule -> run model -> sample -> postprocess (design.md §8), plus the thread that owns
all MLX state and serves requests submitted from other threads through a queue."""

from __future__ import annotations

import hashlib
import queue
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..cache import BlockManager
from ..cache.hashing import HashKey, root_hash
from ..cache.policy import KVPolicy
from ..config import EngineConfig, PolicyConfig, check_policy
from ..errors import ConfigError, OutOfKVMemory, PromptTooLong, SamplingError, ZkvError
from ..kernels.kv_quant import QuantSpec
from ..models.loader import LoadedModel, load_model
from ..storage.kv_pool import KVPool
from ..storage.ssd_store import SSDStore
from .. import paths, sysinfo
from . import evict
from .runner import ModelRunner
from .sampler import NO_TOKEN, can_sample_lazily, sample, sample_lazy
from .scheduler import Scheduler
from .sequence import SamplingParams, Sequence


PENDING = -1  # placeholder for a token still being computed (pipelined decode)


@dataclass(slots=True)
class Event:
    """What a request receives: text deltas (with the token id) and finally done or error."""

    kind: str  # "token" | "done" | "error"
    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None
    error: Exception | None = None
    usage: dict = field(default_factory=dict)


def plan_pool(cfg: EngineConfig, lm: LoadedModel, max_context: int) -> tuple[int, mx.Dtype]:
    """Returns (num_blocks, kv dtype) for the configured KV memory.

    "dynamic" takes `dynamic_fraction` of the memory available after the weights, capped at what
    max_num_seqs sequences of max_context tokens could use (never less than one full context).
    """
    kv = cfg.kv
    dtype = lm.dtype if kv.dtype == "auto" else getattr(mx, kv.dtype)
    per_block = KVPool.bytes_per_block(lm.n_layers, lm.n_kv_heads, kv.block_size, lm.head_dim, dtype,
                                       QuantSpec.from_config(kv))
    blocks_per_ctx = -(-max_context // kv.block_size) + 1
    if kv.memory == "dynamic":
        budget = int(sysinfo.available_memory() * kv.dynamic_fraction)
        n = min(budget // per_block, blocks_per_ctx * min(cfg.max_num_seqs, 4))
        n = max(n, min(blocks_per_ctx, budget // per_block), 1)
    else:
        n = kv.memory // per_block
        if n < 1:
            raise ConfigError(
                f"kv_cache_memory {kv.memory} bytes is smaller than one KV block ({per_block} bytes for "
                f"block size {kv.block_size}); use --kv-cache-memory {per_block * blocks_per_ctx} or more (one full "
                "context)"
            )
    return int(n), dtype


class Engine:
    """Synchronous core. Not thread-safe: use EngineThread from other threads."""

    def __init__(self, lm: LoadedModel, cfg: EngineConfig):
        self.lm = lm
        self.cfg = cfg
        self.max_context = cfg.max_context or lm.max_context
        num_blocks, kv_dtype = plan_pool(cfg, lm, self.max_context)
        self.runner = ModelRunner(lm, num_blocks, cfg.kv.block_size, kv_dtype, kv=cfg.kv)
        self.blocks = BlockManager(num_blocks, cfg.kv.block_size)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.prefill_chunk)
        self.eos = set(lm.tokenizer.eos_token_ids)
        self._listeners: dict[int, callable] = {}
        self.scheduler.on_admit = self._count_admission
        self.scheduler.on_pressure = self._relieve_pressure
        self.session_pins: dict = {}  # (user, name) -> pinned block ids, least recently used first
        self.sessions_released = 0
        self._init_prefix_cache(kv_dtype)
        self._init_ssd()
        self._inflight: tuple[list[Sequence], mx.array, list | None] | None = None
        self.policy_dropped_blocks = 0
        self.default_policy = self.make_policy(cfg.policy)

    # -- long-context policies ------------------------------------------------------------------------
    def make_policy(self, cfg: PolicyConfig | None) -> KVPolicy | None:
        """A request's policy from its config (None: keep every token); checks it fits this engine."""
        if cfg is not None:
            check_policy(self.cfg.kv, cfg.kind, cfg.budget, cfg.sinks, cfg.recent)  # the KV format first
        return KVPolicy.from_config(cfg, self.cfg.kv.block_size)

    def _apply_policies(self) -> None:
        """Drops blocks of sequences about to outgrow their budget (before blocks are allocated)."""
        running = [s for s in self.scheduler.running if s.policy is not None]
        if not running:
            return
        # h2o ranks blocks by attention mass: before it drops any, take the in-flight step's mass (only then, so
        # decode stays pipelined on the steps that drop nothing: block_size - 1 of every block_size)
        if self._inflight is not None and any(s.policy.kind == "h2o" and self._drops(s) for s in running):
            self._resolve()
        pool = self.blocks.pool
        for seq in running:
            if seq.is_finished or not seq.block_table:
                continue
            gone = evict.enforce(seq, self._n_new(seq), self.runner,
                                 lambda b: pool.free_blocks([pool.blocks[b]]), self._private_block)
            self.policy_dropped_blocks += len(gone)

    def _n_new(self, seq: Sequence) -> int:
        """Tokens the next step writes for a sequence under a policy (a prefill chunk, or the decode token)."""
        if seq.in_prefill:
            return min(seq.policy.chunk, seq.prefill_len - seq.num_computed, self.cfg.prefill_chunk)
        return seq.num_tokens - seq.num_computed

    def _drops(self, seq: Sequence) -> bool:
        """Whether the policy drops blocks of `seq` before its next step (evictions() is non-empty)."""
        if seq.is_finished or not seq.block_table:
            return False
        return seq.cache_len + self._n_new(seq) > seq.policy.budget

    def _private_block(self, block_id: int) -> int:
        # copy on write: a block other sequences use, or that the prefix cache publishes, is copied first
        pool = self.blocks.pool
        b = pool.blocks[block_id]
        if b.ref_count == 1 and b.block_hash is None:
            return block_id
        new = pool.get_new_blocks(1)[0]
        self.runner.copy_block(block_id, new.block_id)
        pool.free_blocks([b])
        return new.block_id

    # -- prefix cache ---------------------------------------------------------------------------------
    def _init_prefix_cache(self, kv_dtype) -> None:
        pc = self.cfg.prompt_cache
        self.kv_format = self.runner.pool.format_name
        fp = self.lm.fingerprint
        self._public_root = root_hash(fp, self.kv_format, "public")
        self._user_roots: dict[str, bytes] = {}
        self.counters = {"prompt_cache_hits": 0, "prompt_cache_misses": 0, "hit_tokens": 0, "miss_tokens": 0}
        self.per_user: dict[str, dict] = {}
        self.bytes_per_block = self.runner.pool.total_bytes // max(1, self.runner.pool.num_blocks)
        self._cap_blocks = None if pc.size is None else pc.size // self.bytes_per_block
        tok = self.lm.tokenizer
        # A shared prefix is recognised in chat prompts (as a system message) and in raw prompts (as text).
        self._shared: list[list[int]] = []
        self.prefixes: dict[str, dict] = {}
        for spec in pc.prefixes:
            chat_ids = tok.encode_chat([{"role": "system", "content": spec.content}], add_generation_prompt=False)
            self.prefixes[spec.name] = {"spec": spec, "ids": chat_ids, "pinned_blocks": []}
            if spec.shared:
                self._shared += [chat_ids, tok.encode(spec.content)]

    # -- SSD tier -------------------------------------------------------------------------------------
    def _init_ssd(self) -> None:
        t = self.cfg.tiers
        self.ssd = None
        self._staged: list[tuple[int, object, object]] = []
        if not (t.ssd and self.cfg.prompt_cache.enabled):
            return
        base = Path(t.dir) if t.dir else paths.cache_dir() / "kv-blocks"
        fmt = hashlib.sha256(f"{self.lm.fingerprint}|{self.kv_format}".encode()).hexdigest()[:16]
        if t.size == "auto":
            try:
                base.mkdir(parents=True, exist_ok=True)
                free = shutil.disk_usage(base).free
            except OSError:
                free = 0
            size = min(max(free // 10, 256 << 20), 64 << 30)
        else:
            size = t.size
        try:
            (ks, kd), (vs, vd) = self.runner.pool.block_layout()
            n = self.runner.pool.n_layers
            self.ssd = SSDStore(base / fmt, size, layout=(((n, *ks), kd), ((n, *vs), vd)))
        except OSError as e:
            raise ConfigError(f"cannot use the SSD cache directory {base}: {e}; pass --ssd-dir or --ssd-cache off")
        self.blocks.secondary = self
        self.blocks.pool.on_evict = self._spill

    def contains(self, h: bytes) -> bool:
        return self.ssd is not None and self.ssd.contains(h)

    def load(self, h: bytes, token_ids, block_id: int) -> bool:
        """Promotes a block from SSD: its K/V are staged and written into the pool before the next forward."""
        got = self.ssd.get(h, token_ids)
        if got is None:
            return False
        self._staged.append((block_id, got[0], got[1]))
        return True

    def _flush_staged(self) -> None:
        if not self._staged:
            return
        staged, self._staged = self._staged, []
        kvp = self.runner.pool
        kvp.import_blocks([b for b, _, _ in staged],
                          [np.stack([k[layer] for _, k, _ in staged]) for layer in range(kvp.n_layers)],
                          [np.stack([v[layer] for _, _, v in staged]) for layer in range(kvp.n_layers)])

    def _spill(self, block) -> None:
        # A cached block is about to be reused: copy it to the SSD tier first (once).
        if self.ssd is None or block.block_hash is None or self.ssd.contains(block.block_hash):
            return
        self._flush_staged()
        ks, vs = self.export_kv([block.block_id])
        self.ssd.put(block.block_hash, block.token_ids, np.stack([k[0] for k in ks]), np.stack([v[0] for v in vs]))

    def close_tiers(self) -> None:
        """Spills every cached block not yet on SSD (so the next process finds them) and stops the writer."""
        if self.ssd is None:
            return
        for b in self.blocks.pool.blocks:
            if b.block_hash is not None:
                self._spill(b)
        self.ssd.close()

    def hash_key(self, user: str, prompt_ids: list[int]) -> HashKey | None:
        """The hash salts of a request: public for a registered shared prefix at its start, else the user's."""
        if not self.cfg.prompt_cache.enabled:
            return None
        root = self._user_roots.get(user)
        if root is None:
            root = self._user_roots[user] = root_hash(self.lm.fingerprint, self.kv_format, "user:" + user)
        shared = max((len(p) for p in self._shared if prompt_ids[: len(p)] == p), default=0)
        return HashKey(self._public_root, root, shared)

    def preload_prefixes(self) -> None:
        """Computes the prefixes marked `preload` and pins their blocks (never evicted)."""
        for name, entry in self.prefixes.items():
            spec = entry["spec"]
            if not spec.preload or not self.cfg.prompt_cache.enabled:
                continue
            user = "local"
            seq = self.add_request(entry["ids"], SamplingParams(max_tokens=1, temperature=0.0), user,
                                   lambda ev: None)
            while not seq.is_finished:
                self.step()
            self._resolve()
            probe = Sequence(prompt_ids=entry["ids"] + [0], params=seq.params, user=user)
            probe.hash_key = self.hash_key(user, entry["ids"])
            blocks = self.blocks.match_prefix(probe)
            self.blocks.pool.touch(blocks)  # the pin is a reference that is never dropped
            for b in blocks:
                b.pinned = True
            entry["pinned_blocks"] = [b.block_id for b in blocks]

    def _count_admission(self, seq: Sequence) -> None:
        hit = seq.num_cached_tokens
        c = self.counters
        c["prompt_cache_hits" if hit else "prompt_cache_misses"] += 1
        c["hit_tokens"] += hit
        c["miss_tokens"] += len(seq.prompt_ids) - hit
        u = self.per_user.setdefault(seq.user, {"requests": 0, "hit_tokens": 0, "miss_tokens": 0})
        u["requests"] += 1
        u["hit_tokens"] += hit
        u["miss_tokens"] += len(seq.prompt_ids) - hit

    def _register(self, seq: Sequence) -> None:
        if seq.evicted:  # blocks computed after a drop depend on a shortened context: never published
            return
        self.blocks.register_full_blocks(seq, min(seq.num_computed, seq.num_known_tokens))

    def _trim_cache(self) -> None:
        pool = self.blocks.pool
        ttl = self.cfg.prompt_cache.ttl
        if ttl is not None:
            pool.evict_expired(time.monotonic(), ttl)
        if self._cap_blocks is not None:
            pool.enforce_cap(self._cap_blocks)

    # -- sessions -------------------------------------------------------------------------------------
    def full_blocks(self, user: str, token_ids: list[int]) -> list[int]:
        """Block ids holding the K/V of the full blocks of `token_ids` (as cached for `user`), in order."""
        probe = Sequence(prompt_ids=list(token_ids) + [0], params=SamplingParams(), user=user)
        probe.hash_key = self.hash_key(user, token_ids)
        if probe.hash_key is None:
            return []
        return [b.block_id for b in self.blocks.match_prefix(probe)]

    def set_pins(self, key, block_ids: list[int]) -> None:
        """Makes `block_ids` the resident blocks of session `key` (most recently used now)."""
        old = self.session_pins.pop(key, [])
        self.pin(block_ids)
        self.unpin(old)
        self.session_pins[key] = list(block_ids)

    def drop_pins(self, key) -> None:
        """Releases a session's resident blocks (they stay cached, and spill to SSD when reused)."""
        self.unpin(self.session_pins.pop(key, []))

    def _relieve_pressure(self) -> bool:
        # Out of blocks: release the least recently used session (its blocks spill to SSD as they are reused).
        if not self.session_pins:
            return False
        key = next(iter(self.session_pins))
        self.drop_pins(key)
        self.sessions_released += 1
        return True

    def pin(self, block_ids: list[int]) -> None:
        """Holds a reference on blocks (a session keeps its conversation resident)."""
        self.blocks.pool.touch([self.blocks.pool.blocks[i] for i in block_ids])

    def unpin(self, block_ids: list[int]) -> None:
        """Drops references taken by `pin`; the blocks stay cached (LRU) until reused."""
        self.blocks.pool.free_blocks([self.blocks.pool.blocks[i] for i in reversed(block_ids)])

    def export_kv(self, block_ids: list[int]) -> tuple[list, list]:
        """Copies the stored bytes of blocks out of the pool: per layer numpy arrays, block axis first."""
        self._flush_staged()
        return self.runner.pool.export_blocks(block_ids)

    def import_kv(self, user: str, token_ids: list[int], ks: list, vs: list) -> list[int]:
        """Writes restored K/V blocks into the pool and publishes them to the prefix cache (cached, unpinned).

        Returns:
            The block ids holding them, in order (pin them with `set_pins`). Raises OutOfKVMemory when the pool
            cannot hold them.
        """
        n = ks[0].shape[0] if ks else 0
        if n == 0:
            return []
        pool = self.blocks.pool
        if n > pool.num_free_blocks:
            raise OutOfKVMemory(f"restoring the session needs {n} KV blocks but only {pool.num_free_blocks} are free; "
                                "raise --kv-cache-memory or close other sessions")
        blocks = pool.get_new_blocks(n)
        ids = [b.block_id for b in blocks]
        self.runner.pool.import_blocks(ids, ks, vs)
        mx.eval(self.runner.pool.k, self.runner.pool.v)
        key = self.hash_key(user, token_ids)
        bs = self.blocks.block_size
        parent = None
        for i, b in enumerate(blocks):
            toks = token_ids[i * bs:(i + 1) * bs]
            h = key.block_hash(parent, i, toks, bs)
            parent = h
            existing = pool.get_cached_block(h, toks)
            if existing is None:
                pool.cache_full_block(b, h, toks)
        # One block per position: where the cache already had a block for a position, that one is used.
        held = self.full_blocks(user, token_ids[: n * bs])
        self.pin(held)
        pool.free_blocks(list(reversed(blocks)))  # our temporary references (duplicates fall back to free)
        self.unpin(held)
        return held

    def next_token_logits(self, prompt_ids: list[int], user: str = "local"):
        """Logits [vocab] (float32 numpy) for the token after `prompt_ids`, through the normal cached path.

        For evaluation and tests: runs when the engine is otherwise idle.
        """
        import numpy as np

        if self.has_work():
            raise ZkvError("next_token_logits needs an idle engine")
        seq = self.add_request(prompt_ids, SamplingParams(max_tokens=1, temperature=0.0), user, lambda ev: None)
        logits = None
        while logits is None:
            batch = self.scheduler.schedule()
            self._flush_staged()
            for s, start, end in batch.prefill:
                out = self.runner.prefill(s, start, end)
                mx.eval(out)
                s.num_computed = end
                self._register(s)
                if end == s.prefill_len:
                    logits = np.array(out.astype(mx.float32))
        self.scheduler.finish(seq, "stop")
        self._listeners.pop(seq.seq_id, None)
        return logits

    def clear_cache(self, session_key=None) -> int:
        """Forgets unreferenced cached blocks (pinned prefixes stay); returns how many.

        Args:
            session_key: (user, name): release that session's blocks and forget only those.
        """
        if session_key is None:
            return self.blocks.pool.clear_cached()
        ids = self.session_pins.get(session_key, [])
        self.drop_pins(session_key)
        pool = self.blocks.pool
        n = 0
        for i in ids:
            b = pool.blocks[i]
            if b.ref_count == 0 and b.block_hash is not None:
                pool.drop_cached(b, spill=False)
                n += 1
        return n

    # -- requests -------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, user: str, listener,
                    policy: PolicyConfig | None = None) -> Sequence:
        """Queues a request; `listener(event)` is called on this thread for every event.

        Args:
            policy: the request's long-context policy (None: the engine's default, `cfg.policy`).
        """
        if not prompt_ids:
            raise ConfigError("the prompt is empty; pass at least one token of text")
        vocab = self.lm.model.model.embed_tokens.weight.shape[0]
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ConfigError(f"token id {bad!r} is outside the vocabulary (0..{vocab - 1}); pass ids from this "
                              "model's tokenizer")
        if len(prompt_ids) >= self.max_context:
            raise PromptTooLong(
                f"the prompt has {len(prompt_ids)} tokens but max context is {self.max_context}; "
                "shorten the prompt or raise --max-context"
            )
        seq = Sequence(prompt_ids=list(prompt_ids), params=params, user=user)
        seq.policy = self.default_policy if policy is None else self.make_policy(policy)
        seq.hash_key = self.hash_key(user, seq.prompt_ids)
        seq.max_total = self.max_context
        seq.detok = self.lm.tokenizer.detokenizer()
        seq.t_submit = time.perf_counter()
        self.scheduler.add(seq)
        self._listeners[seq.seq_id] = listener
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stops a request and frees its blocks."""
        if not seq.is_finished:
            self.scheduler.finish(seq, "cancelled")
            self._emit_done(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # -- one step -------------------------------------------------------------------------------------
    def step(self) -> int:
        """Runs one engine step; returns the number of tokens sampled.

        Decode is pipelined (as mlx-lm's generate_step): the step's tokens are sampled lazily and evaluated
        asynchronously while the next step's graph is built from them; their values are postprocessed one step
        later. A sequence holds a PENDING placeholder for its in-flight token until then.
        """
        self._trim_cache()
        self._apply_policies()
        batch = self.scheduler.schedule()
        self._flush_staged()
        for seq in batch.finished:
            self._emit_done(seq)
        sampled = 0
        if batch.prefill:
            sampled += self._resolve()
        for seq, start, end in batch.prefill:
            if seq.is_finished:  # its in-flight token just ended it
                continue
            logits = self.runner.prefill(seq, start, end)
            mass = self.runner.mass
            if end == seq.prefill_len:
                token = sample(logits[None], [seq])[0]
                seq.num_computed = end
                evict.add_mass(seq, mass and mass[0], end - start)
                self._postprocess(seq, token)
                sampled += 1
            else:
                mx.eval(logits)  # runs the chunk; its K/V are what the next chunk attends to
                seq.num_computed = end
                evict.add_mass(seq, mass and mass[0], end - start)
                self._register(seq)
        seqs = [s for s in batch.decode if not s.is_finished]
        if not seqs:
            return sampled + self._resolve()
        prev = self._inflight
        chained = prev is not None and prev[0] == seqs and can_sample_lazily(seqs)
        if not chained:
            sampled += self._resolve()
            seqs = [s for s in seqs if not s.is_finished]
            if not seqs:
                return sampled
        logits = self.runner.decode(seqs, prev[1] if chained else None)
        mass = self.runner.mass  # h2o sequences: attention mass per block (folded in when the step resolves)
        if can_sample_lazily(seqs):
            tokens = sample_lazy(logits, seqs)
            mx.async_eval(tokens, *[m for m in (mass or []) if m is not None])
            for seq in seqs:
                seq.output_ids.append(PENDING)
                seq.num_computed += 1
            if chained:
                sampled += self._resolve()  # the previous step's tokens, computed while this graph was built
            self._inflight = (seqs, tokens, mass)
        else:
            for i, (seq, token) in enumerate(zip(seqs, sample(logits, seqs))):
                seq.num_computed += 1
                evict.add_mass(seq, mass and mass[i], 1)
                self._postprocess(seq, token)
                sampled += 1
        return sampled

    def _resolve(self) -> int:
        """Postprocesses the oldest in-flight decode step (waits for its tokens)."""
        if self._inflight is None:
            return 0
        seqs, tokens, mass = self._inflight
        self._inflight = None
        values = tokens.tolist()
        for j, (seq, token) in enumerate(zip(seqs, values)):
            if seq.is_finished:
                continue  # finished while this step was in flight: its speculative token is dropped
            evict.add_mass(seq, mass and mass[j], 1)
            i = seq.output_ids.index(PENDING)
            del seq.output_ids[i:i + 1]
            self._postprocess(seq, token, slot=i)
        return len(seqs)

    def _postprocess(self, seq: Sequence, token: int, slot: int | None = None) -> None:
        if seq.t_first is None:
            seq.t_first = time.perf_counter()
        p = seq.params
        if token == NO_TOKEN:  # the model's logits were all NaN / -inf: an error, never a silent EOS
            self._fail(seq, SamplingError(
                f"the model produced no finite logit (all NaN or -inf) after {len(seq.output_ids)} generated "
                "tokens; the weights or the input are broken (check the model file, try --weights-dtype float32)"))
            return
        if token in self.eos and not p.ignore_eos:
            self._finish(seq, "stop")
            return
        if slot is None:
            seq.output_ids.append(token)
        else:
            seq.output_ids.insert(slot, token)
        self._register(seq)
        seq.detok.add(token)
        full = seq.detok.text
        reason = None
        if p.stop:
            cut = min((i for i in (full.find(s, max(0, seq.emitted - max(map(len, p.stop)))) for s in p.stop)
                       if i >= 0), default=-1)
            if cut >= 0:
                self._send_text(seq, full[:cut], token)
                self._finish(seq, "stop", flush=False)
                return
            hold = max(map(len, p.stop)) - 1  # a stop string may be starting at the end of the text
        else:
            hold = 0
        n_out = len(seq.output_ids) - seq.output_ids.count(PENDING)
        if n_out >= p.max_tokens or seq.num_tokens >= seq.max_total:
            reason = "length"
        if reason:
            self._finish(seq, reason, token=token)
        else:
            self._send_text(seq, full[: max(seq.emitted, len(full) - hold)], token)

    def _send_text(self, seq: Sequence, upto: str, token: int | None) -> None:
        delta = upto[seq.emitted:]
        seq.emitted = max(seq.emitted, len(upto))
        self._listeners[seq.seq_id](Event("token", text=delta, token_id=token))

    def _finish(self, seq: Sequence, reason: str, flush: bool = True, token: int | None = None) -> None:
        while PENDING in seq.output_ids:  # a speculative in-flight token past the end
            seq.output_ids.remove(PENDING)
        if flush:
            seq.detok.flush()
            self._send_text(seq, seq.detok.text, token)
        self.scheduler.finish(seq, reason)
        self._emit_done(seq)

    def _emit_done(self, seq: Sequence) -> None:
        listener = self._listeners.pop(seq.seq_id, None)
        if listener is None:
            return
        now = time.perf_counter()
        usage = {
            "prompt_tokens": len(seq.prompt_ids),
            "completion_tokens": len(seq.output_ids),
            "cached_tokens": seq.num_cached_tokens,
            "ttft_s": (seq.t_first - seq.t_submit) if seq.t_first else None,
            "total_s": now - seq.t_submit,
        }
        listener(Event("done", finish_reason=seq.finish_reason or "stop", usage=usage))

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """Ends one request with `error` (its blocks are freed; other requests go on)."""
        while PENDING in seq.output_ids:
            seq.output_ids.remove(PENDING)
        self.scheduler.finish(seq, "error")
        listener = self._listeners.pop(seq.seq_id, None)
        if listener:
            listener(Event("error", error=error, finish_reason="error"))

    def fail_all(self, error: Exception) -> None:
        """Ends every request with `error` (after an unexpected failure inside a step)."""
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.finish(seq, "error")
            listener = self._listeners.pop(seq.seq_id, None)
            if listener:
                listener(Event("error", error=error, finish_reason="error"))

    def stats(self) -> dict:
        """KV pool and prefix-cache statistics (see README, "Cache statistics")."""
        pool = self.blocks.pool
        c = self.counters
        bs = self.blocks.block_size
        running = self.scheduler.running
        slots = sum(len(s.block_table) for s in running) * bs
        used_slots = sum(min(s.num_tokens, len(s.block_table) * bs) for s in running)
        looked_up = c["hit_tokens"] + c["miss_tokens"]
        return {
            "total_size": self.runner.pool.total_bytes,
            "used_size": pool.num_used_blocks * self.bytes_per_block,
            "cached_size": pool.num_cached_free_blocks * self.bytes_per_block,
            "block_size": bs,
            "bytes_per_block": self.bytes_per_block,
            "blocks_total": pool.num_blocks,
            "blocks_used": pool.num_used_blocks,
            "blocks_cached": pool.num_cached_free_blocks,
            "blocks_free": pool.num_free_blocks,
            "blocks_pinned": sum(1 for b in pool.blocks if b.pinned),
            "blocks_session": len({i for ids in self.session_pins.values() for i in ids}),
            **c,
            "hit_rate": (c["hit_tokens"] / looked_up) if looked_up else 0.0,
            "evictions": pool.evictions,
            "fragmentation": (1 - used_slots / slots) if slots else 0.0,
            "running": len(running),
            "waiting": len(self.scheduler.waiting),
            "preemptions": self.scheduler.num_preemptions,
            "policy": self.cfg.policy.kind,
            "policy_dropped_blocks": self.policy_dropped_blocks,
            "sessions_resident": len(self.session_pins),
            "sessions_released": self.sessions_released,
            "prompt_cache_enabled": self.cfg.prompt_cache.enabled,
            "ssd_enabled": self.ssd is not None,
            "ssd_blocks": len(self.ssd) if self.ssd is not None else 0,
            "ssd_size": self.ssd.used_bytes if self.ssd is not None else 0,
            "ssd_capacity": self.ssd.capacity if self.ssd is not None else 0,
            "ssd_spills": self.ssd.spills if self.ssd is not None else 0,
            "ssd_promotions": self.ssd.promotions if self.ssd is not None else 0,
            "per_user": {u: dict(v) for u, v in self.per_user.items()},
        }

    def block_map(self) -> list[str]:
        """State of every block: free, used, shared (several users of one block), cached, pinned."""
        out = []
        held = {i for ids in self.session_pins.values() for i in ids}
        for b in self.blocks.pool.blocks:
            if b.pinned or b.block_id in held:
                out.append("pinned")
            elif b.ref_count > 1:
                out.append("shared")
            elif b.ref_count == 1:
                out.append("used")
            elif b.block_hash is not None:
                out.append("cached")
            else:
                out.append("free")
        return out


class RequestHandle:
    """A submitted request as seen from the caller's thread: iterate for events, cancel to stop."""

    def __init__(self, thread: "EngineThread"):
        self._thread = thread
        self._events: queue.Queue[Event] = queue.Queue()
        self.seq: Sequence | None = None
        self.done = False

    def _push(self, ev: Event) -> None:
        self._events.put(ev)

    def __iter__(self):
        while not self.done:
            ev = self._events.get()
            if ev.kind in ("done", "error"):
                self.done = True
            yield ev

    def cancel(self) -> None:
        """Stops generation (blocks are freed on the engine thread)."""
        if not self.done:
            self._thread._commands.put(("cancel", self))


class EngineThread:
    """Owns the Engine (and so every MLX array) on one thread; other threads submit through `submit`.

    Args:
        cfg: the engine config. The model is loaded on the engine thread; `start()` waits for it and raises
        the load error, if any, in the caller's thread.
    """

    def __init__(self, cfg: EngineConfig, progress=None):
        self.cfg = cfg
        self.engine: Engine | None = None
        self._commands: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._progress = progress
        self._thread = threading.Thread(target=self._run, name="zkv-engine", daemon=True)

    def start(self) -> "EngineThread":
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()  # let it release its MLX streams first, or the process aborts at exit
            raise self._error
        return self

    def submit(self, prompt_ids: list[int], params: SamplingParams, user: str = "local",
               policy: PolicyConfig | None = None) -> RequestHandle:
        """Queues a request from any thread; returns its handle immediately (policy: see Engine.add_request)."""
        handle = RequestHandle(self)
        self._commands.put(("add", (prompt_ids, params, user, handle, policy)))
        return handle

    def call(self, fn, *args):
        """Runs fn(engine, *args) on the engine thread and returns its result (for stats and the like)."""
        box: queue.Queue = queue.Queue()
        self._commands.put(("call", (fn, args, box)))
        ok, value = box.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self._thread.is_alive():
            self._commands.put(("stop", None))
            self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            # MLX needs its per-thread streams released before the thread ends, or the process aborts
            # at exit ("terminate called without an active exception"; ml-explore/mlx#4327).
            mx.synchronize()
            mx.clear_streams()

    def _serve(self) -> None:
        try:
            lm = load_model(self.cfg.model, self.cfg.weights_dtype)
            self.engine = Engine(lm, self.cfg)
            self.engine.preload_prefixes()
        except BaseException as e:  # reported to start()'s caller
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        eng = self.engine
        while True:
            try:
                cmd = self._commands.get(block=not eng.has_work())
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd[0] == "stop":
                    eng.fail_all(ZkvError("the engine was closed"))
                    eng._resolve()
                    eng.close_tiers()
                    return
                self._handle(eng, cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if eng.has_work():
                try:
                    eng.step()
                except Exception as e:  # keep serving; the requests in flight get the error
                    traceback.print_exc()
                    eng.fail_all(e)

    def _handle(self, eng: Engine, cmd) -> None:
        kind, arg = cmd
        if kind == "add":
            prompt_ids, params, user, handle, policy = arg
            try:
                handle.seq = eng.add_request(prompt_ids, params, user, handle._push, policy)
            except ZkvError as e:
                handle._push(Event("error", error=e, finish_reason="error"))
        elif kind == "cancel":
            if arg.seq is not None:
                eng.cancel(arg.seq)
        elif kind == "call":
            fn, args, box = arg
            try:
                box.put((True, fn(eng, *args)))
            except Exception as e:
                box.put((False, e))
