"""Session files: one self-describing safetensors file per conversation (see docs/session-format.md).

Tensors `k.{layer}` / `v.{layer}` hold the stored bytes of the session's full blocks, block axis first (float pools:
[n_blocks, n_kv_heads, block_size, head_dim]; quantized pools: uint8 [n_blocks, bytes per block]); the safetensors metadata holds one JSON document under "zkv" (format version, model fingerprint, KV
format, geometry, token ids, messages, per-tensor checksums: xxh3_128 since format version 2, sha256 in version 1 files,
which are still read). Writes are atomic (`storage.atomic.atomic_write`: a fresh
temp file beside the target, fsync, rename, mode 0600); reads validate everything before anything is returned, so an import is all or nothing.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SessionError, SessionFormatError, SessionMismatchError
from ..kv_presets import flags_for_format
from ..names import NAME_RULE, check_name, is_valid_name  # noqa: F401  (check_name: re-exported)
from .atomic import atomic_write
from .checksum import SHA256, XXH3_128, digest, map_read

FORMAT = "zkv-session"
VERSION = 2  # what `write` writes
# Versions `read` accepts and the checksum of each: version 2 only changed sha256 to xxh3_128 (issue #20).
CHECKSUMS = {1: SHA256, 2: XXH3_128}
SUFFIX = ".zkvs"
# Element types of the stored arrays: float pools as is (bfloat16 as raw 16-bit words), quantized pools as bytes.
_DTYPES = {"float32": np.float32, "float16": np.float16, "uint16": np.uint16, "uint8": np.uint8}
_MAX_HEADER = 64 << 20


@dataclass
class SessionData:
    """What a session file holds."""

    meta: dict
    k: list = field(default_factory=list)  # per layer numpy [n_blocks, H, BS, D]
    v: list = field(default_factory=list)
    sinks: list = field(default_factory=list)  # per layer: the sink sections of the blocks in meta["sink_section"]
    # hybrid models: the state layers' arrays after the first meta["state"]["blocks"] blocks (float32 numpy;
    # per state cache a list, None where the cache holds no array)
    state: list = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return self.meta["token_ids"]


def write(path: Path, data: SessionData, *, version: int = VERSION) -> int:
    """Writes a session file atomically; the previous file stays intact on any failure.

    Args:
        path: the file (its directory is created). data: what it holds.
        version: format version to write, a key of `CHECKSUMS`; only compatibility tests and experiments write
            anything but the current `VERSION`.
    Returns:
        The file size in bytes.
    Raises:
        SessionError: the path is a directory or cannot be written.
    """
    from safetensors.numpy import save

    tensors = {}
    for i, (k, v) in enumerate(zip(data.k, data.v)):
        tensors[f"k.{i}"] = np.ascontiguousarray(k)
        tensors[f"v.{i}"] = np.ascontiguousarray(v)
    for i, sk in enumerate(data.sinks):
        tensors[f"ks.{i}"] = np.ascontiguousarray(sk)
    for i, arrays in enumerate(data.state):
        for j, a in enumerate(arrays):
            if a is not None:
                tensors[f"state.{i}.{j}"] = np.ascontiguousarray(a, dtype=np.float32)
    algo = CHECKSUMS[version]
    meta = dict(data.meta, format=FORMAT, version=version,
                checksums={name: digest(algo, t.reshape(-1).view(np.uint8)) for name, t in tensors.items()})
    blob = save(tensors, metadata={"zkv": json.dumps(meta)})
    path = Path(path)
    if path.is_dir():
        raise SessionError(f"cannot write session file {path}: it is a directory; give a file path such as "
                           f"{path / ('session' + SUFFIX)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            f.write(blob)
    except OSError as e:
        raise SessionError(f"cannot write session file {path}: {e.strerror or e}; check that its directory is "
                           "writable and the disk has room") from None
    return len(blob)


def read_meta(path: Path) -> dict:
    """Reads and validates only the JSON metadata of a session file (cheap: for listings)."""
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        header, header_len = _header(f, size, path)
    meta = _meta(header, path)
    # A cut-off copy is caught here already (listings and `sessions info`), not only when its K/V are read.
    ends = [info["data_offsets"][1] for info in header.values()
            if isinstance(info, dict) and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
            and isinstance(info["data_offsets"][1], int)]
    if ends and 8 + header_len + max(ends) > size:
        raise SessionFormatError(f"{path}: file is truncated ({size} bytes, its tensors need "
                                 f"{8 + header_len + max(ends)}); copy it again from where it came from")
    return meta


def read(path: Path) -> SessionData:
    """Reads and fully validates a session file.

    Raises:
        SessionFormatError: corrupt, truncated, of another format or of an unknown version.
    """
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        header, header_len = _header(f, size, path)
        meta = _meta(header, path)
        base = 8 + header_len
        n_layers = meta["n_layers"]
        dtype = np.dtype(_DTYPES[meta["dtype"]])
        data = SessionData(meta=meta)
        kinds = [("k", data.k), ("v", data.v)] + ([("ks", data.sinks)] if "sink_section" in meta else [])
        spans = []  # (name, start, end, shape, out) of every tensor, offsets into the data section
        for i in range(n_layers):
            for kind, out in kinds:
                shape = _shape(meta, kind)
                nbytes = int(np.prod(shape)) * dtype.itemsize
                name = f"{kind}.{i}"
                info = header.get(name)
                if not isinstance(info, dict):
                    raise SessionFormatError(f"{path}: tensor {name} is missing")
                start, end = _offsets(info, name, path)
                if list(info.get("shape", [])) != list(shape) or end - start != nbytes:
                    raise SessionFormatError(f"{path}: tensor {name} has shape {info.get('shape')}, expected {shape}")
                if base + end > size:
                    raise SessionFormatError(f"{path}: file is truncated (tensor {name} ends past the end); copy it again from "
                                             "where it came from")
                spans.append((name, start, end, shape, out, dtype))
        # hybrid models: the state arrays (float32), placed into data.state by (state cache, array) index
        for i, shapes in enumerate(meta.get("state", {}).get("shapes", [])):
            data.state.append([None] * len(shapes))
            for j, shape in enumerate(shapes):
                if shape is not None:
                    spans.append(_state_span(header, f"state.{i}.{j}", tuple(shape), base, size, path,
                                             data.state[i], j))
        # The file is mapped, not copied: the tensors are read-only views of the page cache (the mapping lives as
        # long as they do; session files are replaced by rename, never rewritten in place). `map_read` maps
        # every page up front (MAP_POPULATE where there is one): as fast as the other ways in the A/B here, and it
        # spares the faults where page-cache folios are small.
        end = max((sp[2] for sp in spans), default=0)
        mm = map_read(f.fileno())
    buf = np.frombuffer(mm, dtype=np.uint8, count=end, offset=base)
    # xxh3 (version 2) on one thread: it runs near memory speed, two threads measured no faster. sha256 (version 1
    # files) on two: hashlib releases the GIL, and that measured 1.5x faster (docs/benchmarks.md, w/fastload).
    algo = CHECKSUMS[meta["version"]]
    if algo == SHA256 and (os.cpu_count() or 1) > 1:
        with ThreadPoolExecutor(max_workers=2) as pool:
            digests = list(pool.map(lambda sp: digest(algo, buf[sp[1]:sp[2]]), spans))
    else:
        digests = (digest(algo, buf[sp[1]:sp[2]]) for sp in spans)  # lazy: stops at the first mismatch
    bad = next((sp[0] for sp, d in zip(spans, digests) if d != meta["checksums"].get(sp[0])), None)
    if bad is not None:
        raise SessionFormatError(f"{path}: checksum mismatch in tensor {bad} (the file is corrupt)")
    for name, start, end, shape, out, dt in spans:
        a = buf[start:end].view(dt).reshape(shape)
        if isinstance(out, tuple):  # a state array: (its cache's list, index)
            out[0][out[1]] = a
        else:
            out.append(a)
    return data


def _state_span(header: dict, name: str, shape: tuple, base: int, size: int, path: Path, arrays: list, j: int):
    """A state tensor's span (float32), validated like the K/V tensors."""
    info = header.get(name)
    if not isinstance(info, dict):
        raise SessionFormatError(f"{path}: tensor {name} is missing")
    start, end = _offsets(info, name, path)
    if info.get("dtype") != "F32" or list(info.get("shape", [])) != list(shape) or end - start != int(
            np.prod(shape)) * 4:
        raise SessionFormatError(f"{path}: tensor {name} has shape {info.get('shape')}, expected {list(shape)}")
    if base + end > size:
        raise SessionFormatError(f"{path}: file is truncated (tensor {name} ends past the end); copy it again from "
                                             "where it came from")
    return (name, start, end, shape, (arrays, j), np.dtype(np.float32))


def join_sinks(data: SessionData) -> tuple[list, list]:
    """K rows with their sink sections put back (zeros, flag 0, for blocks without sinks), and V rows."""
    sec = data.meta.get("sink_section")
    if not sec:
        return data.k, data.v
    out = []
    for k, sk in zip(data.k, data.sinks):
        full = np.zeros((k.shape[0], k.shape[1] + sec["bytes"]), dtype=k.dtype)
        full[:, : k.shape[1]] = k
        full[sec["blocks"], k.shape[1]:] = sk
        out.append(full)
    return out, data.v


def _open(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise SessionError(f"session file not found: {path}") from None
    except OSError as e:
        raise SessionError(f"cannot open session file {path}: {e}") from None


def _header(f, size: int, path: Path) -> tuple[dict, int]:
    head = f.read(8)
    if len(head) != 8:
        raise SessionFormatError(f"{path}: not a session file (too short)")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER:
        raise SessionFormatError(f"{path}: not a session file (bad header length {n})")
    if 8 + n > size:
        raise SessionFormatError(f"{path}: file is truncated (its header needs {8 + n} bytes, the file has {size}); "
                                 "copy it again")
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):
        raise SessionFormatError(f"{path}: not a session file (unreadable header)") from None
    if not isinstance(header, dict):
        raise SessionFormatError(f"{path}: not a session file (header is not an object)")
    return header, n


def _meta(header: dict, path: Path) -> dict:
    md = header.get("__metadata__")
    if not isinstance(md, dict) or not isinstance(md.get("zkv"), str):
        raise SessionFormatError(f"{path}: not a zkv session file (no zkv metadata)")
    try:
        meta = json.loads(md["zkv"])
    except ValueError:
        raise SessionFormatError(f"{path}: session metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SessionFormatError(f"{path}: not a zkv session file")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in CHECKSUMS:
        raise SessionFormatError(
            f"{path}: session format version {version!r} is not supported (this zkv-mlx reads versions "
            f"{', '.join(map(str, CHECKSUMS))}); upgrade zkv-mlx"
        )
    ints = ("n_layers", "n_kv_heads", "block_size", "head_dim", "n_blocks")
    for key in ("block_shape", "v_block_shape"):
        shape = meta.get(key, meta.get("block_shape"))
        if not (isinstance(shape, list) and 1 <= len(shape) <= 4
                and all(isinstance(x, int) and not isinstance(x, bool) and 0 < x < 1 << 24 for x in shape)):
            raise SessionFormatError(f"{path}: session metadata has no valid {key}")
    strs = ("model_fingerprint", "kv_format", "dtype", "name", "user")
    ok = all(isinstance(meta.get(k), int) and not isinstance(meta.get(k), bool) and 0 <= meta[k] < 1 << 20
             for k in ints)
    ok = ok and all(isinstance(meta.get(k), str) for k in strs) and meta.get("dtype") in _DTYPES
    ok = ok and isinstance(meta.get("token_ids"), list) and all(
        isinstance(t, int) and not isinstance(t, bool) and -(1 << 31) <= t < 1 << 31 for t in meta["token_ids"])
    ok = ok and isinstance(meta.get("messages"), list) and isinstance(meta.get("checksums"), dict)
    ok = ok and meta.get("n_blocks", -1) * meta.get("block_size", 0) <= len(meta.get("token_ids") or [])
    sec = meta.get("sink_section")
    if sec is not None:
        ok = ok and isinstance(sec, dict) and isinstance(sec.get("bytes"), int) and 4 < sec["bytes"] < 1 << 24
        blocks = sec.get("blocks") if isinstance(sec, dict) else None
        ok = ok and isinstance(blocks, list) and len(set(blocks)) == len(blocks) and all(
            isinstance(b, int) and not isinstance(b, bool) and 0 <= b < meta.get("n_blocks", 0) for b in blocks)
        ok = ok and meta.get("dtype") == "uint8"
    st = meta.get("state")
    if st is not None:
        ok = ok and isinstance(st, dict) and isinstance(st.get("blocks"), int) and 0 <= st["blocks"] <= meta.get(
            "n_blocks", -1) and isinstance(st.get("shapes"), list) and all(
            isinstance(arrs, list) and all(s is None or (isinstance(s, list) and len(s) <= 8 and all(
                isinstance(x, int) and not isinstance(x, bool) and 0 < x < 1 << 24 for x in s)) for s in arrs)
            for arrs in st["shapes"])
        dts = st.get("dtypes") if isinstance(st, dict) else None
        ok = ok and isinstance(dts, list) and len(dts) == len(st["shapes"]) and all(
            isinstance(ds, list) and len(ds) == len(arrs) and all(
                (d is None) == (s is None) and d in (None, "float32", "float16", "bfloat16") for d, s in zip(ds, arrs))
            for ds, arrs in zip(dts, st["shapes"]))
    if not ok:
        raise SessionFormatError(f"{path}: session metadata is incomplete or has values of the wrong type")
    # Ids are checked against the model's vocabulary on import (ZKV._restore names the id and the vocab size).
    if not is_valid_name(meta["name"]):
        raise SessionFormatError(f"{path}: the stored session name {meta['name']!r} is invalid (a session name is "
                                 f"{NAME_RULE}); this file cannot be imported")
    return meta


def _shape(meta: dict, kind: str) -> tuple[int, ...]:
    if kind == "ks":  # sink sections, only for the blocks that start a sequence
        return (len(meta["sink_section"]["blocks"]), meta["sink_section"]["bytes"])
    # V may have its own layout (quantized KV: keys per channel, values per token)
    return (meta["n_blocks"], *(meta.get("v_block_shape", meta["block_shape"]) if kind == "v" else meta["block_shape"]))


def _offsets(info: dict, name: str, path: Path) -> tuple[int, int]:
    off = info.get("data_offsets")
    if not (isinstance(off, list) and len(off) == 2 and all(isinstance(x, int) for x in off) and 0 <= off[0] <= off[1]):
        raise SessionFormatError(f"{path}: tensor {name} has bad offsets")
    return off[0], off[1]


def check_compatible(meta: dict, fingerprint: str, kv_format: str, path: Path | str = "session") -> None:
    """Raises SessionMismatchError when the file was made with another model or KV format."""
    if meta["model_fingerprint"] != fingerprint:
        raise SessionMismatchError(
            f"{path} was made with model {meta['model_fingerprint']} but the loaded model is {fingerprint}; "
            f"load the model the session was created with (it was {meta.get('model_name', 'unknown')}; CLI: "
            "--model PATH, Python: ZKV(PATH))"
        )
    if meta["kv_format"] != kv_format:
        flags = flags_for_format(str(meta["kv_format"]))
        fix = (f"start zkv-mlx with {flags} (Python: the same settings as ZKV keyword arguments)" if flags else
               "it was made by another version of zkv-mlx: open it with that version")
        raise SessionMismatchError(
            f"{path} stores KV format {meta['kv_format']!r} but this engine uses {kv_format!r}; {fix}"
        )
