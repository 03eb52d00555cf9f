"""The SSD tier: content-addressed KV block files with a byte budget and LRU order (design.md §7).

One file per block, named by its chained hash (which carries the user salt): `<hash hex>.kvb` =
magic | u32 header length | JSON header {tokens, k: {shape, dtype}, v: {shape, dtype}, xxh3_128} | K of every layer |
V of every layer. K and V are described separately: in quantized formats (int4 with per-channel keys, k8v4) they
differ in size. Files written before that (one `shape`/`dtype` for both) are still read. The payload's checksum is
xxh3_128 (`storage.checksum`, issue #20); files written before it carry a `sha256` instead, which is still checked
(never trusted unchecked); a file with neither is dropped like a corrupt one.
Files are written by a background thread (`atomic_write`: fresh temp file, fsync, rename), so the decode path never
waits on the disk.
At start-up every file is validated (torn or corrupt ones are deleted) and the budget is enforced, oldest first.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .checksum import SHA256, XXH3_128, digest, xxh3_hex

MAGIC = b"ZKVB\x01\x00\x00\x00"
SUFFIX = ".kvb"
_DTYPES = {"float32": np.float32, "float16": np.float16, "uint16": np.uint16, "uint8": np.uint8}


class SSDStore:
    """Block files for one model + KV format under `directory`.

    Args:
        directory: where the files go (created). capacity: byte budget (LRU beyond it).
        layout: ((k_shape, k_dtype), (v_shape, v_dtype)) of the arrays of one block, dtype as a numpy name
            (e.g. ((2, 2, 16, 64), "float16") twice, or ((n_layers, 1088), "uint8"), ((n_layers, 576), "uint8"));
            files holding another layout are dropped at start-up and never returned. None: no check.
    """

    def __init__(self, directory: Path, capacity: int, layout=None):
        self.dir = Path(directory)
        self.layout = None if layout is None else tuple((tuple(int(x) for x in sh), str(dt)) for sh, dt in layout)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity = int(capacity)
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # hash -> file size, least recently used first
        self._bytes = 0
        self._pending: set[bytes] = set()
        self.dropped_at_start = 0
        self.spills = 0
        self.promotions = 0
        self._load_index()
        self._queue: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="zkv-ssd-writer", daemon=True)
        self._writer.start()

    # -- index ----------------------------------------------------------------------------------------
    def _path(self, h: bytes) -> Path:
        return self.dir / (h.hex() + SUFFIX)

    def _load_index(self) -> None:
        entries = []
        for p in self.dir.iterdir():
            if p.name.startswith(".") and ".tmp" in p.name:
                p.unlink(missing_ok=True)  # a write interrupted by a crash
                continue
            if not p.name.endswith(SUFFIX):
                continue
            try:
                h = bytes.fromhex(p.name[: -len(SUFFIX)])
                self._read(p, None, self.layout)
                st = p.stat()
            except (ValueError, OSError):
                p.unlink(missing_ok=True)
                self.dropped_at_start += 1
                continue
            entries.append((st.st_mtime, h, st.st_size))
        for _, h, size in sorted(entries):
            self._index[h] = size
            self._bytes += size
        self._enforce_cap()

    def _enforce_cap(self) -> None:
        while self._bytes > self.capacity and self._index:
            h, size = self._index.popitem(last=False)
            self._bytes -= size
            self._path(h).unlink(missing_ok=True)

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._index)

    def contains(self, h: bytes) -> bool:
        """Whether a block with this hash is on disk (or being written)."""
        with self._lock:
            return h in self._index or h in self._pending

    # -- write ----------------------------------------------------------------------------------------
    def put(self, h: bytes, token_ids, k: np.ndarray, v: np.ndarray) -> None:
        """Queues a block for writing (no-op if already stored).

        Args:
            h: the block's chained hash. token_ids: its tokens. k, v: its stored bytes for every layer, layer axis
                first ([n_layers, H, BS, D] float, or [n_layers, bytes] uint8 for quantized formats); K and V may
                differ in shape.
        Raises:
            ValueError: k, v do not match the store's layout (a file that could never be read back).
        """
        if self.layout is not None and _layout(k, v) != self.layout:
            raise ValueError(f"block of layout {_layout(k, v)} does not match the SSD store's {self.layout}")
        with self._lock:
            if h in self._index or h in self._pending:
                return
            self._pending.add(h)
        self._queue.put((h, list(token_ids), k, v))

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            h, tokens, k, v = item
            try:
                payload = np.ascontiguousarray(k).tobytes() + np.ascontiguousarray(v).tobytes()
                header = json.dumps({"tokens": tokens, "k": {"shape": list(k.shape), "dtype": k.dtype.name},
                                     "v": {"shape": list(v.shape), "dtype": v.dtype.name},
                                     XXH3_128: xxh3_hex(payload)}).encode()
                path = self._path(h)
                with atomic_write(path) as f:
                    f.write(MAGIC + struct.pack("<I", len(header)) + header + payload)
                with self._lock:
                    size = path.stat().st_size
                    self._index[h] = size
                    self._bytes += size
                    self.spills += 1
                    self._enforce_cap()
            except OSError:
                pass  # a cache: a failed write only costs a recompute later
            finally:
                with self._lock:
                    self._pending.discard(h)
                self._queue.task_done()

    def flush(self) -> None:
        """Waits until queued writes are on disk."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join(timeout=30)

    # -- read -----------------------------------------------------------------------------------------
    def get(self, h: bytes, token_ids) -> tuple[np.ndarray, np.ndarray] | None:
        """Reads a block; None if absent, corrupt (then deleted) or holding other tokens."""
        with self._lock:
            if h not in self._index:
                return None
        path = self._path(h)
        try:
            k, v = self._read(path, list(token_ids), self.layout)
        except (ValueError, OSError):
            with self._lock:
                size = self._index.pop(h, 0)
                self._bytes -= size
            path.unlink(missing_ok=True)
            return None
        with self._lock:
            if h in self._index:
                self._index.move_to_end(h)
        try:
            os.utime(path)  # LRU order survives restarts
        except OSError:
            pass
        self.promotions += 1
        return k, v

    def discard(self, h: bytes) -> None:
        """Forgets a block and deletes its file (a distributed promotion that another rank could not read)."""
        self.flush()
        with self._lock:
            self._bytes -= self._index.pop(h, 0)
        self._path(h).unlink(missing_ok=True)

    @staticmethod
    def _read(path: Path, token_ids, layout=None) -> tuple[np.ndarray, np.ndarray]:
        data = path.read_bytes()
        if data[:8] != MAGIC or len(data) < 12:
            raise ValueError("not a block file")
        (n,) = struct.unpack("<I", data[8:12])
        try:
            header = json.loads(data[12:12 + n])
            if not isinstance(header, dict):
                raise TypeError("not an object")
            if "k" in header:
                arrays = [(tuple(header[x]["shape"]), header[x]["dtype"]) for x in ("k", "v")]
            else:  # files of the first version: K and V of one shape
                arrays = [(tuple(header["shape"]), header["dtype"])] * 2
            if layout is not None and tuple(arrays) != layout:
                raise ValueError("block file of another layout")
            arrays = [(shape, np.dtype(_DTYPES[dt])) for shape, dt in arrays]
            sizes = [int(np.prod(shape, dtype=np.int64)) * dt.itemsize for shape, dt in arrays]
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"bad block file header: {e}") from None
        payload = memoryview(data)[12 + n:]  # views, not copies, of the one read of the file
        if any(not 1 <= len(shape) <= 5 for shape, _ in arrays) or len(payload) != sum(sizes):
            raise ValueError("torn block file")
        algo = XXH3_128 if XXH3_128 in header else SHA256  # sha256: files written before issue #20
        if digest(algo, payload) != header.get(algo):
            raise ValueError("corrupt block file")
        if token_ids is not None and header.get("tokens") != token_ids:
            raise ValueError("block file holds other tokens")
        (ks, kd), (vs, vd) = arrays
        return (np.frombuffer(payload[:sizes[0]], kd).reshape(ks), np.frombuffer(payload[sizes[0]:], vd).reshape(vs))


def _layout(k: np.ndarray, v: np.ndarray) -> tuple:
    return ((tuple(k.shape), k.dtype.name), (tuple(v.shape), v.dtype.name))
