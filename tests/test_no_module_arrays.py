"""Issue 17 §6: no MLX array is built at import time. MLX streams are per thread: an array made while a module
is imported belongs to the importing thread's stream, and the engine thread that first evaluates it fails with
"There is no Stream(cpu, 0) in current thread" (on a Mac the Metal kernels then fell back to the reference for
the whole run). Arrays are made on the thread that uses them; see docs/kernels.md, "Threads".

Two checks: a static scan (AST) of every module in zkv_mlx/ and app/ for MLX calls that run at import (module
and class bodies, decorators, default arguments), and a fresh process that imports every module and looks for
MLX arrays in module and class namespaces (this also catches arrays made through helper functions).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("zkv_mlx", "app")
MLX_MODULES = ("mlx.core", "mlx.nn")
# MLX calls that make no array (and no stream) and so may run at import.
ALLOWED = {"compile", "default_device", "metal.is_available", "finfo", "iinfo"}


class _Aliases:
    """Names that refer to mlx.core / mlx.nn modules, or to objects imported from them."""

    def __init__(self, tree: ast.Module):
        self.modules: dict[str, str] = {}  # local name -> "mlx.core" / "mlx.nn" / "mlx.core.random" ...
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "mlx" or a.name.startswith("mlx."):
                        self.modules[a.asname or a.name.split(".")[0]] = a.name if a.asname else "mlx"
            elif isinstance(node, ast.ImportFrom) and node.module and (node.module == "mlx"
                                                                        or node.module.startswith("mlx.")):
                for a in node.names:
                    self.modules[a.asname or a.name] = f"{node.module}.{a.name}"

    def mlx_name(self, func: ast.expr) -> str | None:
        """'zeros' for mx.zeros(...), 'random.normal' for mx.random.normal(...); None if not an MLX callable."""
        parts = []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if not isinstance(func, ast.Name) or func.id not in self.modules:
            return None
        full = ".".join([self.modules[func.id], *reversed(parts)])
        for root in MLX_MODULES:
            if full.startswith(root + "."):
                return full[len(root) + 1:]
        return None


def _import_time_nodes(body: list[ast.stmt]):
    """Expressions of `body` that run when the module is imported (not function or lambda bodies)."""
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from stmt.decorator_list
            yield from stmt.args.defaults
            yield from (d for d in stmt.args.kw_defaults if d is not None)
        elif isinstance(stmt, ast.ClassDef):
            yield from stmt.decorator_list
            yield from stmt.bases
            yield from (k.value for k in stmt.keywords)
            yield from _import_time_nodes(stmt.body)
        else:
            nested = [s for f in ("body", "orelse", "finalbody") for s in getattr(stmt, f, []) or []]
            nested += [s for h in getattr(stmt, "handlers", []) for s in h.body]
            if nested:  # if / try / with / for at module level: their headers, then their statements
                for f in ("test", "iter", "target"):
                    if getattr(stmt, f, None) is not None:
                        yield getattr(stmt, f)
                yield from (item.context_expr for item in getattr(stmt, "items", []))
                yield from _import_time_nodes(nested)
            else:
                yield stmt


def _calls(node: ast.AST):
    """Calls in `node`, not descending into lambdas (their bodies run later)."""
    if isinstance(node, ast.Lambda):
        return
    if isinstance(node, ast.Call):
        yield node
    for child in ast.iter_child_nodes(node):
        yield from _calls(child)


def import_time_mlx_calls(source: str, filename: str = "<src>") -> list[str]:
    """'file:line: mx.zeros' for every MLX call (outside ALLOWED) that runs at import."""
    tree = ast.parse(source, filename)
    aliases = _Aliases(tree)
    found = []
    for node in _import_time_nodes(tree.body):
        for call in _calls(node):
            name = aliases.mlx_name(call.func)
            if name is not None and name not in ALLOWED:
                found.append(f"{filename}:{call.lineno}: {ast.unparse(call.func)}")
    return found


def _sources():
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path.relative_to(ROOT)


def test_the_scan_sees_every_package_module():
    files = {str(p) for p in _sources()}
    assert "zkv_mlx/kernels/metal.py" in files and "app/chat_app.py" in files and len(files) > 60


@pytest.mark.parametrize("src", [
    "import mlx.core as mx\n_DUMMY = mx.zeros((1,), dtype=mx.float16)",  # the bug of issue 17 §6
    "import mlx.core as mx\nclass A:\n    x = mx.array([1])",
    "import mlx.core as mx\ndef f(x=mx.ones(2)):\n    return x",
    "import mlx.core as mx\ndef f(*, x=mx.arange(2)):\n    return x",
    "from mlx.core import arange\nA = arange(3)",
    "import mlx.core as core\nB = [core.array(i) for i in range(2)]",
    "import mlx.core as mx\n@dec(mx.array(1))\ndef f():\n    pass",
    "import mlx.core as mx\nif True:\n    K = mx.random.key(0)",
    "import mlx.core as mx\ntry:\n    S = mx.new_stream(mx.cpu)\nexcept Exception:\n    pass",
    "import mlx.nn as nn\nLAYER = nn.Linear(2, 2)",
    "from mlx import core\nT = {'a': core.full((2,), 1.0)}",
    "import mlx.core\nZ = mlx.core.zeros(1)",
])
def test_the_scan_flags_import_time_arrays(src):
    assert import_time_mlx_calls(src)


@pytest.mark.parametrize("src", [
    "import mlx.core as mx\ndef f():\n    return mx.zeros(1)",
    "import mlx.core as mx\n_c = mx.compile(lambda x: x * 2, shapeless=True)",
    "import mlx.core as mx\nL = lambda: mx.zeros(1)",
    "import mlx.core as mx\nT = mx.float16\nD = (mx.float16, mx.float32)",
    "import mlx.core as mx\nclass A:\n    def f(self):\n        return mx.array(1)",
    "import numpy as np\nA = np.zeros(3)",
])
def test_the_scan_allows_deferred_arrays(src):
    assert import_time_mlx_calls(src) == []


def test_no_mlx_array_is_built_at_import_in_zkv_mlx_or_app():
    found = [hit for p in _sources() for hit in import_time_mlx_calls((ROOT / p).read_text(encoding="utf-8"), str(p))]
    assert found == [], ("MLX calls that run at import (their arrays belong to the importing thread; make them "
                         "where they are used, on the engine thread):\n" + "\n".join(found))


_RUNTIME_SCAN = r"""
import importlib, inspect, json, pkgutil
import zkv_mlx
import mlx.core as mx
import mlx.nn as nn

def arrays(value, depth=0):
    if isinstance(value, (mx.array, nn.Module)):
        return True
    if depth < 2 and isinstance(value, (list, tuple, set, frozenset)):
        return any(arrays(v, depth + 1) for v in value)
    if depth < 2 and isinstance(value, dict):
        return any(arrays(v, depth + 1) for v in value.values())
    return False

names = []
for top in ("zkv_mlx", "zkv_mlx.app"):  # app/ ships as zkv_mlx.app (a package-dir mapping, walked on its own)
    pkg = importlib.import_module(top)
    names += [top] + [m.name for m in pkgutil.walk_packages(pkg.__path__, top + ".")]
names = list(dict.fromkeys(names))
found = []
for name in names:
    mod = importlib.import_module(name)
    for attr, value in vars(mod).items():
        if arrays(value):
            found.append(f"{name}.{attr}")
        if inspect.isclass(value) and value.__module__ == name:
            found += [f"{name}.{attr}.{a}" for a, v in vars(value).items() if arrays(v)]
print(json.dumps({"modules": names, "found": found}))
"""


def test_no_mlx_array_in_any_module_namespace_after_a_fresh_import():
    res = subprocess.run([sys.executable, "-c", _RUNTIME_SCAN], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "zkv_mlx.kernels.metal" in out["modules"] and "zkv_mlx.app.chat_app" in out["modules"]
    assert out["found"] == []
