"""`fake_metal_kernel`: `mx.fast.metal_kernel`'s signature, executed on the CPU by the simulator.

Inputs are copied into guarded buffers (out-of-bounds accesses fault and come back as `SimFault`), outputs
start poisoned (all bits set: NaN for floats) unless `init_value` is given, and the threads of each
threadgroup run as fibers in forward, reversed or random order (`sim_options`).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import build
from .source import GeneratedKernel, InputMeta, generate, verbose_text

ORDERS = {"forward": 0, "reverse": 1, "random": 2}
MAX_THREADS_PER_THREADGROUP = 1024


class SimError(RuntimeError):
    """The kernel misbehaved in the simulator (divergent barrier, too much threadgroup memory, ...)."""


class SimFault(SimError):
    """The kernel read or wrote outside a buffer."""


@dataclass(slots=True)
class Options:
    order: str = "forward"
    seed: int = 0
    collect: list | None = None  # when a list: record (name, generated kernel), do not compile or run


_options = Options()
_run_lock = threading.Lock()
_runtime = None
_libs: dict[str, ctypes.CDLL] = {}
_lib_for_source: dict[str, str] = {}
stats = {"launches": 0}


@contextlib.contextmanager
def sim_options(order: str | None = None, seed: int | None = None, collect: list | None = None):
    """Temporarily sets the thread order ("forward", "reverse", "random"), its seed, or collect mode."""
    global _options
    if order is not None and order not in ORDERS:
        raise ValueError(f"order={order!r}: use one of {sorted(ORDERS)}")
    old = _options
    _options = Options(order or old.order, old.seed if seed is None else seed, collect)
    try:
        yield _options
    finally:
        _options = old


def _rt():
    global _runtime
    if _runtime is None:
        lib = ctypes.CDLL(str(build.runtime_library()), mode=ctypes.RTLD_GLOBAL)
        lib.zsim_alloc.restype = ctypes.c_void_p
        lib.zsim_alloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
        lib.zsim_free.argtypes = [ctypes.c_void_p]
        lib.zsim_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                    ctypes.c_uint, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
        _runtime = lib
    return _runtime


def compile_kernel(kernel: GeneratedKernel) -> str:
    path = _lib_for_source.get(kernel.source)
    if path is None:
        path = str(build.kernel_library(kernel))
        _lib_for_source[kernel.source] = path
    return path


def compile_many(kernels, workers: int = 2) -> None:
    """Compiles kernels in parallel (g++ runs outside the GIL)."""
    todo = {k.source: k for k in kernels if k.source not in _lib_for_source}
    _rt()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(compile_kernel, todo.values()))


def _as_array(x) -> mx.array:
    return x if isinstance(x, mx.array) else mx.array(x)  # bool -> bool_, int -> int32, float -> float32


def _to_bytes(a: mx.array) -> bytes:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a)).tobytes()


def _np_dtype(dtype: mx.Dtype):
    return np.uint16 if dtype == mx.bfloat16 else np.dtype(str(dtype).split(".")[-1].replace("bool_", "bool"))


def _from_bytes(raw: bytes, shape, dtype: mx.Dtype) -> mx.array:
    arr = np.frombuffer(raw, dtype=_np_dtype(dtype)).reshape(shape)
    out = mx.array(arr)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


def _fault_message(info, names) -> str:
    tag, offset, write = info
    if tag == -2:
        return "stack overflow in a simulated thread"
    if tag < 0:
        return f"invalid memory access at address {offset:#x} (not near any kernel buffer)"
    name, size = names[tag]
    what = "write" if write == 1 else "read" if write == 0 else "access"
    where = f"{-offset} bytes before its start" if offset < 0 else f"byte offset {offset}"
    return f"out-of-bounds {what} of `{name}` ({size} bytes) at {where}"


def launch(kernel: GeneratedKernel, arrays, output_shapes, output_dtypes, grid, threadgroup, init_value):
    """Runs `kernel` and returns its outputs as mx.arrays."""
    lib_path = compile_kernel(kernel)
    group = [min(t, g) for t, g in zip(threadgroup, grid)]
    if group[0] * group[1] * group[2] > MAX_THREADS_PER_THREADGROUP:
        raise ValueError(f"Thread group size ({group[0] * group[1] * group[2]}) is greater than  the maximum "
                         f"allowed threads per threadgroup ({MAX_THREADS_PER_THREADGROUP}).")
    datas, out_slots = [], []
    for p in kernel.params:
        if p.role == "input":
            datas.append((p.name, _to_bytes(arrays[p.index])))
        elif p.role == "shape":
            datas.append((p.name, np.array(arrays[p.index].shape, np.int32).tobytes()))
        elif p.role == "strides":
            a = arrays[p.index]
            strides = [int(np.prod(a.shape[i + 1:])) for i in range(a.ndim)]  # inputs are made contiguous
            datas.append((p.name, np.array(strides, np.int64).tobytes()))
        elif p.role == "ndim":
            datas.append((p.name, np.array(arrays[p.index].ndim, np.int32).tobytes()))
        elif p.role == "output":
            out_slots.append(len(datas))
            n = int(np.prod(output_shapes[p.index], dtype=np.int64))
            dtype = output_dtypes[p.index]
            if init_value is None:
                datas.append((p.name, None, n * dtype.size))
            else:
                init = mx.full((n,), init_value, dtype=dtype)
                datas.append((p.name, _to_bytes(init)))
    rt = _rt()
    with _run_lock:
        lib = _libs.get(lib_path) or _libs.setdefault(lib_path, ctypes.CDLL(lib_path))
        ptrs, names = [], []
        try:
            for tag, item in enumerate(datas):
                size = item[2] if len(item) == 3 else len(item[1])
                ptr = rt.zsim_alloc(size, 0xFF, tag)
                if not ptr:
                    raise SimError("cannot allocate a simulator buffer")
                if item[1] is not None:
                    ctypes.memmove(ptr, item[1], size)
                ptrs.append(ptr)
                names.append((item[0], size))
            args = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
            err = ctypes.create_string_buffer(2048)
            info = (ctypes.c_longlong * 3)()
            rc = 0
            if all(grid):
                stats["launches"] += 1
                rc = rt.zsim_launch(ctypes.cast(lib.zsim_entry, ctypes.c_void_p), args,
                                    (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*group), ORDERS[_options.order],
                                    _options.seed, err, len(err), info)
            if rc == 1:
                raise SimError(f"{kernel.name}: {err.value.decode(errors='replace')}")
            if rc == 2:
                raise SimFault(f"{kernel.name}: {_fault_message(list(info), names)}")
            return [_from_bytes(ctypes.string_at(ptrs[k], names[k][1]), output_shapes[i], output_dtypes[i])
                    for i, k in enumerate(out_slots)]
        finally:
            for ptr in ptrs:
                rt.zsim_free(ptr)


class SimKernel:
    """The callable `fake_metal_kernel` returns; call it like MLX's kernel object."""

    def __init__(self, name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs):
        self.name, self.input_names, self.output_names = name, list(input_names), list(output_names)
        self.source, self.header, self.atomic_outputs = source, header, atomic_outputs
        self.ensure_row_contiguous = ensure_row_contiguous  # inputs are always copied contiguous here

    def generated(self, inputs, output_dtypes, template=None) -> GeneratedKernel:
        metas = [InputMeta(a.dtype, a.ndim, a.size) for a in map(_as_array, inputs)]
        return generate(self.name, self.input_names, self.output_names, self.source, self.header,
                        self.atomic_outputs, metas, list(output_dtypes), template)

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None):
        for got, want, what in ((len(inputs), len(self.input_names), "inputs"),
                                (len(output_shapes), len(self.output_names), "output_shapes"),
                                (len(output_dtypes), len(self.output_names), "output_dtypes")):
            if got != want:
                raise ValueError(f"[metal_kernel] Expected `{what}` to have size {want} but got size {got}.\n")
        arrays = [_as_array(x) for x in inputs]
        # Evaluate the inputs here, on the calling thread, as MLX does: streams are per thread, so a lazy input
        # built on another thread fails ("There is no Stream(cpu, 0) in current thread") as it would on a Mac.
        mx.eval(*arrays)
        kernel = self.generated(arrays, output_dtypes, template)
        if verbose:
            sys.stdout.write(verbose_text(self.name, kernel.source))
            sys.stdout.flush()
        shapes = [tuple(s) for s in output_shapes]
        if _options.collect is not None:
            _options.collect.append((self.name, kernel))
            return [mx.full(s, float("nan"), dtype=d) for s, d in zip(shapes, output_dtypes)]
        return launch(kernel, arrays, shapes, list(output_dtypes), tuple(grid), tuple(threadgroup), init_value)


def fake_metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                      atomic_outputs=False, compile_options=None):
    """Drop-in for `mx.fast.metal_kernel` (monkeypatch it in) that runs kernels in the simulator."""
    if not output_names:
        raise ValueError("[metal_kernel] Must specify at least one output.")
    if compile_options is not None:
        if not isinstance(compile_options, dict):
            raise ValueError("[metal_kernel] Expected `compile_options` to be a dict.")
        for key, value in compile_options.items():
            if key != "math_mode":
                raise ValueError(f"[metal_kernel] Unknown compile option `{key}`.")
            if value not in ("safe", "relaxed", "fast"):
                raise ValueError("[metal_kernel] Expected math_mode to be 'safe', 'relaxed', or 'fast'.")
    return SimKernel(name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs)
