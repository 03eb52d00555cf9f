"""Pure-Python KV block bookkeeping (no mlx/numpy): free queue, block pool, block manager."""

from .block_manager import BlockManager
from .block_pool import Block, BlockPool
from .free_queue import FreeBlockQueue

__all__ = ["Block", "BlockPool", "BlockManager", "FreeBlockQueue"]
