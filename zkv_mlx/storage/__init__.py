"""Physical KV bytes: the per-layer pool arrays (kv_pool, with channel_keys and block_bytes), the SSD tier
(ssd_store), session files (session_file) and atomic file writes (atomic)."""

from .kv_pool import KVPool

__all__ = ["KVPool"]
