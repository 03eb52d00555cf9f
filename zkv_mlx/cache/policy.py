"""Long-context KV policies: which whole blocks a sequence drops when it outgrows its KV budget.

Pure bookkeeping (no MLX): the engine (engine/drop.py) frees the chosen blocks, re-rotates the keys of older
kept blocks so positions stay "within the cache" as StreamingLLM does, and feeds back attention mass for H2O.

- window (StreamingLLM, Xiao et al. 2023): keep the blocks holding the first `sinks` tokens and the most recent
  blocks; drop the oldest other block first.
- h2o (heavy hitters, Zhang et al. 2023): keep the sink blocks, the blocks of the last `recent` tokens and, among
  the others, the blocks with the highest accumulated attention mass, accumulated with exponential decay (half-life
  `half_life` tokens, per query: TOVA-like recency of the evidence), weighed by a recency prior exp(-age /
  `recency`) where age is the block's distance from the end of the cache in tokens: an older block stays only
  while it draws clearly more attention than the newer blocks it displaces. Measured on 4096-token windows at
  budget 512 (docs/benchmarks.md): the plain average of the attention a block received ranks worse, as do the
  latest chunk alone (no memory) and slower decays; without the prior every ranking lost to window.

A sequence's table holds full blocks and at most one partial block (its tail, last); only full blocks are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


# h2o: half-life of a block's attention mass, in tokens (0.95 per 16-token chunk, the best of the decays measured)
H2O_HALF_LIFE = 216.0
# h2o: tokens of age over which a block's score falls by e (the best of 64..4096 measured at budget 512)
H2O_RECENCY = 256.0


@dataclass(frozen=True, slots=True)
class KVPolicy:
    """A sequence's policy.

    Args:
        kind: "window" or "h2o" (the "full" policy is represented by None).
        budget: KV tokens the sequence may hold after each write.
        block_size: tokens per block.
        sinks: leading tokens always kept (rounded up to whole blocks).
        recent: h2o: trailing tokens always kept (rounded up to whole blocks); default one block.
        half_life: h2o: tokens after which a block's past attention mass counts half.
        recency: h2o: a block's score is its mass times exp(-age / recency), age in tokens from the end of the
            cache (0 = no recency prior).
    """

    kind: str
    budget: int
    block_size: int
    sinks: int = 4
    recent: int | None = None
    half_life: float = H2O_HALF_LIFE
    recency: float = H2O_RECENCY

    @classmethod
    def from_config(cls, cfg, block_size: int) -> "KVPolicy | None":
        """From a `config.PolicyConfig` (None for the full policy); checks the budget fits the block size."""
        if cfg is None or cfg.kind == "full":
            return None
        p = cls(cfg.kind, cfg.budget, block_size, cfg.sinks, cfg.recent)
        p.check()
        return p

    @property
    def sink_blocks(self) -> int:
        return -(-self.sinks // self.block_size)

    @property
    def recent_blocks(self) -> int:
        """Full blocks at the end protected by recency (the partial tail block is always kept)."""
        if self.kind != "h2o":
            return 0
        return 1 if self.recent is None else -(-self.recent // self.block_size)

    @property
    def min_budget(self) -> int:
        # sinks + protected recent blocks + one droppable block + the tail block + room for one chunk block
        return (self.sink_blocks + self.recent_blocks + 3) * self.block_size

    @property
    def chunk(self) -> int:
        """Most new tokens per prefill chunk: what fits the budget after the kept blocks (a block multiple)."""
        bs = self.block_size
        room = self.budget - (self.sink_blocks + self.recent_blocks + 2) * bs
        return max(bs, room // 2 // bs * bs)

    def check(self) -> None:
        if self.kind not in ("window", "h2o"):
            raise ConfigError(f"kv_policy: {self.kind!r} is not one of full, window, h2o")
        if self.budget < self.min_budget:
            raise ConfigError(
                f"budget {self.budget} is too small for kv_policy {self.kind} with {self.sinks} sink tokens"
                + (f" and {self.recent_blocks * self.block_size} recent tokens" if self.kind == "h2o" else "")
                + f" at block size {self.block_size}; use --budget {self.min_budget} or more")

    def drops(self, cache_len: int, n_new: int, scores: list[float] | None = None) -> list[int]:
        """Table indices of the blocks to drop so that `cache_len + n_new <= budget`.

        Args:
            cache_len: tokens the sequence holds now (its table has ceil(cache_len / block_size) blocks).
            n_new: tokens about to be written.
            scores: h2o: a score per table index (higher = keep); ignored by window.
        Returns:
            Ascending table indices (possibly fewer than needed when too few blocks may be dropped).
        """
        bs = self.block_size
        excess = cache_len + n_new - self.budget
        if excess <= 0:
            return []
        need = -(-excess // bs)
        n_full = cache_len // bs
        candidates = list(range(self.sink_blocks, n_full - self.recent_blocks))
        if self.kind == "h2o":
            if scores is None:
                raise ValueError("h2o needs attention scores per block")
            candidates.sort(key=lambda i: (scores[i], i))
        return sorted(candidates[:need])


def rotation_shifts(n_blocks: int, dropped: list[int], block_size: int) -> list[int]:
    """Position shift of each kept block after dropping `dropped` (table indices), in the new table's order.

    StreamingLLM positions tokens by their place in the cache. Queries and new keys keep their original
    positions, so the blocks after the last dropped one need no change; a kept block moves forward by the tokens
    dropped after it (RoPE is a rotation by position, so shifting a stored key is one more rotation).
    """
    drop = set(dropped)
    shifts, after = [], 0
    for i in reversed(range(n_blocks)):
        if i in drop:
            after += block_size
        else:
            shifts.append(after)
    return shifts[::-1]
