"""Chained block hashes for prefix caching (design.md §5-6).

h_i = sha256(h_{i-1} || salt_i || token ids of block i). Roots cover a format version, the model fingerprint and the
KV format; blocks inside a shared prefix use the public root as salt, all others the user's root, so two users
never produce the same hash for private blocks.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

HASH_VERSION = "zkv-block-hash-v1"


def root_hash(model_fingerprint: str, kv_format: str, salt: str) -> bytes:
    """Returns the root of a hash chain.

    Args:
        model_fingerprint: hash of the weights + tokenizer.
        kv_format: the KV storage format (dtype, bits, group, rotation...) as a string.
        salt: "public" or "user:<name>".
    """
    return hashlib.sha256(f"{HASH_VERSION}|{model_fingerprint}|{kv_format}|{salt}".encode()).digest()


def chain(parent: bytes, salt: bytes, token_ids) -> bytes:
    """Hash of one full block given its parent's hash."""
    h = hashlib.sha256(parent)
    h.update(salt)
    h.update(array("i", token_ids).tobytes())
    return h.digest()


@dataclass(slots=True, frozen=True)
class HashKey:
    """What a sequence's block hashes depend on besides its tokens.

    public: root of the public chain; private: the user's root; shared_len: tokens of a registered shared prefix
    at the start of the prompt (blocks wholly inside it use the public salt).
    """

    public: bytes
    private: bytes
    shared_len: int = 0

    def block_hash(self, parent: bytes | None, index: int, token_ids, block_size: int) -> bytes:
        """Hash of block `index` (whose parent hash is `parent`, None for the first block)."""
        salt = self.public if (index + 1) * block_size <= self.shared_len else self.private
        return chain(parent if parent is not None else salt, salt, token_ids)
