"""Facts about the machine: backend, memory."""

import os
import sys

import mlx.core as mx


def backend() -> str:
    """Returns "metal" when MLX runs on the GPU, else "cpu"."""
    try:
        if mx.metal.is_available() and mx.default_device() == mx.gpu:
            return "metal"
    except Exception:
        pass
    return "cpu"


def total_memory() -> int:
    """Returns the machine's memory in bytes (unified memory on a Mac)."""
    if backend() == "metal":
        try:
            return int(mx.metal.device_info()["memory_size"])
        except Exception:
            pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory() -> int:
    """Returns memory available for new allocations in bytes (MemAvailable on Linux)."""
    if sys.platform == "linux":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return total_memory() - mx.get_active_memory()
