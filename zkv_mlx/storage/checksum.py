"""Integrity checksums of stored KV bytes, and the mapped read of a file (session files and SSD block files).

The checksums guard against torn or corrupted files (disk errors, truncated copies), not against tampering: a
session file is trusted once it names the right model and passes its checks, as before. xxh3_128 (the `xxhash`
package, XXH3 by Yann Collet, https://github.com/Cyan4973/xxHash) made reading a 189 MB session file 9-10x
faster than hashlib's sha256 did on the 2-core dev VM (docs/benchmarks.md, "Issue #20 (w/fastload)"): checking a
restored session no longer costs more than mapping it. sha256 stays for reading files written before the switch.
"""

from __future__ import annotations

import hashlib
import mmap

import xxhash

XXH3_128 = "xxh3_128"
SHA256 = "sha256"


def xxh3_hex(buf) -> str:
    """xxh3_128 of a buffer as 32 hex characters.

    Args:
        buf: any object with the buffer protocol (bytes, memoryview, a C-contiguous numpy array); not copied.
    Returns:
        The 128-bit digest as lowercase hex (xxhash's canonical big-endian form, as `xxhsum -H2` prints it).
    """
    return xxhash.xxh3_128_hexdigest(buf)


def sha256_hex(buf) -> str:
    """sha256 of a buffer as 64 hex characters (the checksum of session format version 1 and old SSD files)."""
    return hashlib.sha256(buf).hexdigest()


def digest(algo: str, buf) -> str:
    """The hex digest of `buf` by the algorithm named `algo` (XXH3_128 or SHA256).

    Raises:
        KeyError: another name (callers validate the name from the file before).
    """
    return {XXH3_128: xxh3_hex, SHA256: sha256_hex}[algo](buf)


# How `map_read` asks the kernel for the pages; docs/benchmarks.md "Issue #20 (w/fastload)" has the A/B (all four
# within noise on Linux 6.18, whose large page-cache folios leave few faults anyway). "populate": MAP_POPULATE (Linux) maps every page of the file at mmap time, one pass in the kernel,
# instead of a page fault per 4-64 KiB on first touch; "willneed" / "sequential": a plain map plus
# MADV_WILLNEED (read-ahead) / MADV_SEQUENTIAL; "plain": none of these.
MAP_MODE = "populate"


def map_read(fileno: int, mode: str | None = None) -> mmap.mmap:
    """Maps a whole file read-only.

    Args:
        fileno: an open file descriptor. mode: "populate", "willneed", "sequential" or "plain" (default
            `MAP_MODE`); where the platform lacks MAP_POPULATE (macOS) or madvise, the map is plain.
    Returns:
        The mapping (its buffer stays valid after the file is closed).
    Raises:
        OSError / ValueError: as `mmap.mmap` (e.g. an empty file).
    """
    mode = mode or MAP_MODE
    if mode == "populate" and hasattr(mmap, "MAP_POPULATE"):
        return mmap.mmap(fileno, 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    mm = mmap.mmap(fileno, 0, access=mmap.ACCESS_READ)
    advice = {"willneed": "MADV_WILLNEED", "sequential": "MADV_SEQUENTIAL"}.get(mode)
    if advice and hasattr(mm, "madvise") and hasattr(mmap, advice):
        mm.madvise(getattr(mmap, advice))
    return mm
