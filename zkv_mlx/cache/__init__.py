"""Pure-Python KV block bookkeeping (no mlx/numpy): free queue, block pool, block manager, prefix cache."""

from .block_manager import BlockManager, BlockStats, LowerTier
from .block_pool import Block, BlockPool
from .free_queue import FreeBlockQueue
from .prefix_cache import PrefixCache

__all__ = ["Block", "BlockPool", "BlockManager", "BlockStats", "FreeBlockQueue", "LowerTier", "PrefixCache"]
