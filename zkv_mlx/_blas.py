"""Load an optimized system BLAS before MLX so the CPU backend's matmuls use it (design.md §10).

The mlx-cpu wheel links a reference BLAS through the `cblas_*`/`sgemm_` symbols; loading OpenBLAS with
RTLD_GLOBAL first makes the dynamic linker resolve those symbols to OpenBLAS (~14x faster GEMM here).
Opt out with ZKV_NO_OPENBLAS=1. Must run before the first `import mlx.core` in the process.
"""

import ctypes
import glob
import os
import sys

_CANDIDATES = (
    "/usr/lib/*/openblas-pthread/libblas.so.3",
    "/usr/lib/*/openblas-openmp/libblas.so.3",
    "/usr/lib/*/openblas-serial/libblas.so.3",
    "/usr/lib/*/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

#: Path of the BLAS library loaded by `preload()`, or None.
loaded_path: str | None = None
#: Why nothing was loaded (for `zkv-mlx doctor`).
reason: str = "not attempted"


def find_openblas() -> str | None:
    """Returns the path of a system OpenBLAS library, or None when there is none."""
    for pattern in _CANDIDATES:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def preload() -> str | None:
    """Loads OpenBLAS RTLD_GLOBAL if possible; safe to call more than once.

    Returns:
        The loaded library path, or None.
    """
    global loaded_path, reason
    if loaded_path is not None:
        return loaded_path
    if sys.platform != "linux":
        reason = "not Linux (Accelerate/Metal are used on a Mac)"
        return None
    if os.environ.get("ZKV_NO_OPENBLAS", "") not in ("", "0"):
        reason = "disabled by ZKV_NO_OPENBLAS"
        return None
    if "mlx.core" in sys.modules:
        reason = "mlx.core was imported before zkv_mlx; import zkv_mlx first"
        return None
    path = find_openblas()
    if path is None:
        reason = "no OpenBLAS found (apt-get install libopenblas0-pthread)"
        return None
    try:
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    except OSError as e:
        reason = f"failed to load {path}: {e}"
        return None
    loaded_path = path
    reason = "loaded"
    return path
