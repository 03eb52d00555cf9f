"""Physical KV bytes: the per-layer pool arrays (and, later, SSD tier and session files)."""

from .kv_pool import KVPool

__all__ = ["KVPool"]
