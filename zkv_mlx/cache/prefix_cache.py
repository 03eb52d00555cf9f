"""The prefix cache's policy over the block manager: whose hash root a request uses (public for a registered
shared prefix, else the user's own), the configured prefixes (shared and preloaded), hit/miss counters and the
TTL / size cap of cached blocks. The blocks themselves and the hash -> block map live in the BlockManager."""

from __future__ import annotations

from dataclasses import dataclass, field

from .hashing import HashKey, root_hash


@dataclass(slots=True)
class Prefix:
    """A configured prefix: its spec, its token ids as a system message, and the blocks held when preloaded."""

    spec: object  # config.PrefixSpec
    ids: list[int]
    pinned_blocks: list[int] = field(default_factory=list)


class PrefixCache:
    """Hash roots, registered prefixes and counters of one engine.

    Args:
        cfg: the `PromptCacheConfig`. fingerprint, kv_format: what a block's K/V depend on (part of every root).
        tokenizer: encodes the prefixes. bytes_per_block: converts the configured size cap to blocks.
    """

    def __init__(self, cfg, fingerprint: str, kv_format: str, tokenizer, bytes_per_block: int):
        self.cfg = cfg
        self.enabled = cfg.enabled
        self._fingerprint = fingerprint
        self._kv_format = kv_format
        self._public_root = root_hash(fingerprint, kv_format, "public")
        self._user_roots: dict[str, bytes] = {}
        self.counters = {"prompt_cache_hits": 0, "prompt_cache_misses": 0, "hit_tokens": 0, "miss_tokens": 0}
        self.per_user: dict[str, dict] = {}
        self.cap_blocks = None if cfg.size is None else cfg.size // bytes_per_block
        # A shared prefix is recognised in chat prompts (as a system message) and in raw prompts (as text).
        self._shared: list[list[int]] = []
        self.prefixes: dict[str, Prefix] = {}
        for spec in cfg.prefixes:
            chat_ids = tokenizer.encode_chat([{"role": "system", "content": spec.content}],
                                             add_generation_prompt=False)
            self.prefixes[spec.name] = Prefix(spec, chat_ids)
            if spec.shared:
                self._shared += [chat_ids, tokenizer.encode(spec.content)]

    def hash_key(self, user: str, prompt_ids: list[int]) -> HashKey | None:
        """The hash salts of a request: public for a registered shared prefix at its start, else the user's."""
        if not self.enabled:
            return None
        root = self._user_roots.get(user)
        if root is None:
            root = self._user_roots[user] = root_hash(self._fingerprint, self._kv_format, "user:" + user)
        shared = max((len(p) for p in self._shared if prompt_ids[: len(p)] == p), default=0)
        return HashKey(self._public_root, root, shared)

    def to_preload(self) -> list[Prefix]:
        """The prefixes to compute and pin at start."""
        return [p for p in self.prefixes.values() if p.spec.preload] if self.enabled else []

    def preloaded_blocks(self) -> set[int]:
        """Ids of the blocks pinned by preloaded prefixes."""
        return {i for p in self.prefixes.values() for i in p.pinned_blocks}

    def count_admission(self, seq) -> None:
        """Counts a request's first admission: its prompt tokens served from the cache, and the rest."""
        hit, miss = seq.num_cached_tokens, len(seq.prompt_ids) - seq.num_cached_tokens
        c = self.counters
        c["prompt_cache_hits" if hit else "prompt_cache_misses"] += 1
        c["hit_tokens"] += hit
        c["miss_tokens"] += miss
        u = self.per_user.setdefault(seq.user, {"requests": 0, "hit_tokens": 0, "miss_tokens": 0})
        u["requests"] += 1
        u["hit_tokens"] += hit
        u["miss_tokens"] += miss

    def trim(self, blocks) -> None:
        """Applies the TTL and the size cap to the cached free blocks of `blocks` (a BlockManager)."""
        blocks.trim_cache(self.cfg.ttl, self.cap_blocks)
