"""A/B in one process: reading a 4096-token session file, old reader vs new, and the ways of mapping it.

Not a shipped command (issue #20 item 3). Writes one session file of random float32 blocks with the bundled
model's geometry (30 layers, 256 blocks of [3 KV heads, 16 tokens, 64 dims]: 188.8 MB, the size `zkv-mlx bench
restore --tokens 4096` writes) twice, as format version 1 (sha256) and version 2 (xxh3_128), then alternates, for
--rounds rounds, every variant below on the same files (kept in the page cache, as in the bench) and prints the
median seconds of each:

- old-v1: the reader of commit 5235717 (the base of this branch, loaded from git): version 1 file, sha256 on two
  threads, MADV_SEQUENTIAL.
- v1-<mode> / v2-<mode>: this branch's reader on the version 1 / 2 file, the mapping made by `map_read(mode)`:
  populate (MAP_POPULATE), willneed (MADV_WILLNEED), sequential (MADV_SEQUENTIAL), plain.

"read" is `session_file.read` alone (validate, map, checksums); "+copy" adds copying every tensor into a
preallocated destination of the pool's size (what `KVPool._write_in_place` does on a restore), so the page
faults a lazy mapping defers to the copy are counted too; "faults" is the process's minor page faults during
"+copy" (getrusage).

Then the SSD tier: 256 block files of the same model (one block, all 30 layers: 737 KB each) promoted with
`SSDStore.get`, files with an xxh3_128 header (written now) vs the same files with the sha256 header written before
issue #20 (still read and checked); "ssd" is the median seconds for all 256.

    .venv/bin/python docs/experiments/ab_session_read.py --rounds 7
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from zkv_mlx.storage import checksum, session_file
from zkv_mlx.storage.ssd_store import MAGIC, SSDStore

BASE = "5235717"
REPO = Path(__file__).resolve().parents[2]


def _old_reader():
    # the base commit's session_file module, run inside this package so its relative imports resolve
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{BASE}:zkv_mlx/storage/session_file.py"],
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType("zkv_mlx.storage._session_file_" + BASE)
    mod.__package__ = "zkv_mlx.storage"
    sys.modules[mod.__name__] = mod  # dataclasses look their module up there
    exec(compile(src, f"{BASE}:session_file.py", "exec"), mod.__dict__)
    return mod


def _session(n_layers=30, n_blocks=256, shape=(3, 16, 64)):
    rng = np.random.default_rng(0)
    meta = {"name": "ab", "user": "local", "model_fingerprint": "f" * 32, "model_name": "ab",
            "kv_format": "float32;block=16", "dtype": "float32", "n_layers": n_layers, "n_kv_heads": shape[0],
            "block_size": shape[1], "head_dim": shape[2], "n_blocks": n_blocks, "block_shape": list(shape),
            "token_ids": list(range(n_blocks * shape[1])), "messages": []}
    arrays = [rng.standard_normal((n_blocks, *shape), dtype=np.float32) for _ in range(2 * n_layers)]
    return session_file.SessionData(meta=meta, k=arrays[:n_layers], v=arrays[n_layers:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    old = _old_reader()
    data = _session()
    tmp = Path(tempfile.mkdtemp(prefix="zkv-ab-read-"))
    files = {1: tmp / "v1.zkvs", 2: tmp / "v2.zkvs"}
    for version, f in files.items():
        session_file.write(f, data, version=version)
    size = files[2].stat().st_size
    dest = [np.empty_like(a) for a in data.k + data.v]  # the pool's stand-in, its pages touched once
    for d in dest:
        d.fill(0)
    del data

    def new(mode, version):
        def run():
            checksum.MAP_MODE = mode
            return session_file.read(files[version])
        return run

    variants = {"old-v1": lambda: old.read(files[1])}
    for mode in ("populate", "willneed", "sequential", "plain"):
        for version in (1, 2):
            variants[f"v{version}-{mode}"] = new(mode, version)
    times: dict[str, dict[str, list[float]]] = {v: {"read": [], "+copy": [], "faults": []} for v in variants}
    try:
        for r in range(args.rounds):
            for name, fn in variants.items():
                for what in ("read", "+copy"):
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0 = time.perf_counter()
                    got = fn()
                    if what == "+copy":
                        for d, a in zip(dest, got.k + got.v):
                            d[...] = a
                    times[name][what].append(time.perf_counter() - t0)
                    if what == "+copy":
                        times[name]["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                    del got
    finally:
        checksum.MAP_MODE = "populate"
        for f in files.values():
            f.unlink()
        tmp.rmdir()
    out = {name: {what: round(statistics.median(ts), 4) for what, ts in t.items()} for name, t in times.items()}
    # "faults": minor page faults of the process during read + copy (getrusage), median
    print(json.dumps({"rounds": args.rounds, "file_bytes": size, "median_s": out, "ssd": _ssd(args.rounds)},
                     indent=1))


def _ssd(rounds: int, n_blocks: int = 256) -> dict:
    rng = np.random.default_rng(1)
    shape = (30, 3, 16, 64)
    dirs = {algo: Path(tempfile.mkdtemp(prefix=f"zkv-ab-ssd-{algo}-")) for algo in ("xxh3_128", "sha256")}
    blocks = [(bytes([i % 256, i // 256]) * 16, [i]) for i in range(n_blocks)]
    store = SSDStore(dirs["xxh3_128"], capacity=1 << 40)
    for h, tokens in blocks:
        store.put(h, tokens, *rng.standard_normal((2, *shape), dtype=np.float32))
    store.close()
    for p in dirs["xxh3_128"].iterdir():  # the same files as written before the switch: a sha256 header
        raw = p.read_bytes()
        (n,) = struct.unpack("<I", raw[8:12])
        header = json.loads(raw[12:12 + n])
        payload = raw[12 + n:]
        del header["xxh3_128"]
        header["sha256"] = checksum.sha256_hex(payload)
        blob = json.dumps(header).encode()
        (dirs["sha256"] / p.name).write_bytes(MAGIC + struct.pack("<I", len(blob)) + blob + payload)
    stores = {algo: SSDStore(d, capacity=1 << 40) for algo, d in dirs.items()}
    times = {algo: [] for algo in stores}
    try:
        for _ in range(rounds):
            for algo, st in stores.items():
                t0 = time.perf_counter()
                assert all(st.get(h, tokens) is not None for h, tokens in blocks)
                times[algo].append(time.perf_counter() - t0)
    finally:
        for st in stores.values():
            st.close()
        for d in dirs.values():
            for p in d.iterdir():
                p.unlink()
            d.rmdir()
    return {"blocks": n_blocks, "median_s": {algo: round(statistics.median(t), 4) for algo, t in times.items()}}


if __name__ == "__main__":
    main()
