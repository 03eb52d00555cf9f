"""Starts the ranks of a ring job on this machine, as `mlx.launch -n N --backend ring` does (same environment:
MLX_RANK and MLX_HOSTFILE), but returning each rank's process so tests and `bench distributed` can wait on them
with timeouts and stop one of them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile


def free_ports(n: int) -> list[int]:
    """n TCP ports free on 127.0.0.1 right now (the ring's listening ports)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launch_local(n: int, argv: list[str], env: dict | None = None, **popen) -> list[subprocess.Popen]:
    """Starts `python argv...` as ranks 0..n-1 of a local ring job.

    Args:
        n: world size. argv: the script and its arguments (run with this interpreter).
        env: extra environment variables. popen: passed to subprocess.Popen (e.g. stdout=PIPE).
    Returns:
        The processes, rank order.
    """
    hosts = [[f"127.0.0.1:{p}"] for p in free_ports(n)]
    fd, path = tempfile.mkstemp(prefix="zkv-ring-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(hosts, f)
    base = dict(os.environ, **(env or {}), MLX_HOSTFILE=path)
    return [subprocess.Popen([sys.executable, *argv], env=dict(base, MLX_RANK=str(r)), **popen) for r in range(n)]
