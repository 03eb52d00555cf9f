"""One model and its paged KV sharded over several processes or machines with `mx.distributed` (docs/distributed.md).

Rank 0 owns the API, server, TUI, scheduler, prefix cache and block accounting; every rank holds its shard of the
weights (mlx-lm's own tensor-parallel `model.shard()`: its attention and KV heads) and the KV blocks of those
heads. Block tables are the same on every rank, so each step's plan (token ids, positions, block tables) is all
the other ranks need; it reaches them through `mx.distributed` collectives (`group.py`), and they run the same
`ModelRunner` call on their shard (`worker.py`). Rank 0's side is `leader.py`.
"""

from .group import DistGroup, current_group, rank_line
from .worker import serve_if_worker

__all__ = ["DistGroup", "current_group", "rank_line", "serve_if_worker"]
