"""Compiles MLX-generated kernel source as C++ for the simulator, cached by source hash.

The only change made to the source is to `threadgroup` storage declarations (`threadgroup float buf[N];`
becomes `static float buf[N]; zsim_tg_register(...)`, on the same line) so that the fibers of a
threadgroup share it; `threadgroup` in pointer/reference types is dropped. Everything else compiles as
written, against msl_compat.h (force-included, -nostdinc) so non-MSL names fail to compile.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
import threading
from pathlib import Path

from .source import GeneratedKernel

HERE = Path(__file__).resolve().parent
CXX = os.environ.get("ZKV_METAL_SIM_CXX", "g++")
KERNEL_FLAGS = ["-std=c++17", "-O1", "-fPIC", "-shared", "-nostdinc", "-nostdinc++", "-fno-exceptions",
                "-fno-rtti", "-fsingle-precision-constant", "-ffp-contract=off", "-Wno-attributes",
                "-Wno-unused-value", "-include", "msl_compat.h"]
RUNTIME_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared"]
_HEADERS = ("sim_abi.h", "msl_types.h", "msl_compat.h")
_lock = threading.Lock()


class SimCompileError(RuntimeError):
    """The kernel source does not compile under the strict MSL subset."""


def cache_dir() -> Path:
    d = os.environ.get("ZKV_METAL_SIM_CACHE") or os.path.join(tempfile.gettempdir(), f"zkv-metal-sim-{os.getuid()}")
    Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d)


_TOKEN = re.compile(r"""
    (?P<comment>//[^\n]*|/\*.*?\*/)
  | (?P<pp>^[ \t]*\#(?:\\\n|[^\n])*)
  | (?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')
  | (?P<id>[A-Za-z_]\w*)
  | (?P<num>\d[\w.]*)
  | (?P<ws>\s+)
  | (?P<p>.)
""", re.S | re.M | re.X)


def _tokens(src: str):
    return [(m.lastgroup, m.group(), m.start()) for m in _TOKEN.finditer(src)
            if m.lastgroup not in ("comment", "pp", "ws")]


def _declarator_names(toks, k: int) -> tuple[list[str], int]:
    """Names declared by `type a[N], b[M];` starting at token k; also the index of the closing `;`."""
    parts, depth, angle = [[]], 0, 0
    while k < len(toks) and not (depth == 0 and toks[k][1] == ";"):
        t = toks[k][1]
        if t in "([":
            depth += 1
        elif t in ")]":
            depth -= 1
        elif depth == 0 and t in "<>":
            angle += 1 if t == "<" else -1
        if depth == 0 and angle == 0 and t == ",":
            parts.append([])
        else:
            parts[-1].append(toks[k])
        k += 1
    names = []
    for part in parts:
        name, d = None, 0
        for kind, t, _ in part:
            if t == "[" and d == 0:
                break
            if t in "([":
                d += 1
            elif t in ")]":
                d -= 1
            elif kind == "id" and d == 0:
                name = t
        if name:
            names.append(name)
    return names, k


def rewrite_threadgroup(src: str) -> str:
    """Turns threadgroup storage into registered statics; see the module docstring."""
    toks = _tokens(src)
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement)
    for i, (kind, text, pos) in enumerate(toks):
        if kind != "id" or text != "threadgroup":
            continue
        depth, angle, j, is_ref = 0, 0, i + 1, False
        while j < len(toks):
            t = toks[j][1]
            if depth == 0 and angle == 0 and t in (";", ",", ")", "=", "[", "{"):
                break
            if t in "([":
                depth += 1
            elif t in ")]":
                depth -= 1
            elif depth == 0 and t == "<":
                angle += 1
            elif depth == 0 and t == ">":
                angle -= 1
            elif depth == 0 and angle == 0 and t in ("*", "&"):
                is_ref = True
            j += 1
        stop = toks[j][1] if j < len(toks) else ";"
        if is_ref or stop == ")":
            edits.append((pos, pos + len(text), " " * len(text)))
            continue
        if stop == "=":
            raise SimCompileError(f"threadgroup variable with an initializer at offset {pos} (not allowed in Metal)")
        names, end = _declarator_names(toks, i + 1)
        end = toks[end][2] + 1 if end < len(toks) else len(src)
        reg = "".join(f" zsim_tg_register((void*)&{n}, sizeof({n}));" for n in names)
        edits.append((pos, pos + len(text), "static     "))
        edits.append((end, end, reg))
    out, last = [], 0
    for start, end, rep in sorted(edits):
        out.append(src[last:start])
        out.append(rep)
        last = end
    out.append(src[last:])
    return "".join(out)


def launcher(kernel: GeneratedKernel) -> str:
    """C++ entry point the runtime calls once per simulated thread."""
    args = []
    for slot, p in enumerate(q for q in kernel.params if q.role != "attr"):
        if p.ctype.endswith("&"):
            args.append(f"*({p.ctype[:-1]}*)zb[{slot}]")
        else:
            args.append(f"({p.ctype})zb[{slot}]")
    for p in kernel.params:
        if p.role == "attr":
            if p.ctype == "uint3":
                args.append(f"uint3(zi->{p.name}[0], zi->{p.name}[1], zi->{p.name}[2])")
            else:
                args.append(f"zi->{p.name}")
    call = kernel.name + kernel.template_def
    return ('\nextern "C" void zsim_entry(void** zb, const ZsimIds* zi) {\n  (void)zi;\n  '
            + call + "(\n    " + ",\n    ".join(args) + ");\n}\n")


def _cxx_version() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]


def _header_digest() -> str:
    h = hashlib.sha256(_cxx_version().encode())
    for name in _HEADERS + ("runtime.cpp",):
        h.update((HERE / name).read_bytes())
    return h.hexdigest()


_digest: str | None = None


def _compile(cmd: list[str], out: Path, what: str) -> Path:
    tmp = out.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    res = subprocess.run(cmd + ["-o", str(tmp)], capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise SimCompileError(f"{what} does not compile:\n{res.stderr[-6000:]}")
    os.replace(tmp, out)
    return out


def runtime_library() -> Path:
    global _digest
    with _lock:
        if _digest is None:
            _digest = _header_digest()
    out = cache_dir() / f"zsim_runtime_{_digest[:16]}.so"
    if not out.exists():
        _compile([CXX, *RUNTIME_FLAGS, "-I", str(HERE), str(HERE / "runtime.cpp")], out, "runtime.cpp")
    return out


def kernel_library(kernel: GeneratedKernel) -> Path:
    """Compiles (or finds in the cache) the shared library running `kernel`."""
    runtime_library()
    unit = rewrite_threadgroup(kernel.source) + launcher(kernel)
    key = hashlib.sha256((_digest + "\0" + " ".join(KERNEL_FLAGS) + "\0" + unit).encode()).hexdigest()[:24]
    out = cache_dir() / f"k_{key}.so"
    if out.exists():
        return out
    src = cache_dir() / f"k_{key}.cpp"
    src.write_text(unit)
    # -lm: __builtin_expf and friends become libm calls when not folded.
    return _compile([CXX, *KERNEL_FLAGS, "-I", str(HERE), str(src), "-lm"], out, f"kernel {kernel.name} ({src})")
