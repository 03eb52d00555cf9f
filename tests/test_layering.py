"""Imports point down: the layers and rules written in docs/layers.toml, checked over every import in zkv_mlx/ and
app/ (module-level, function-local and relative), plus no import cycle between modules.

The checker is tested on synthetic modules first (a planted forbidden edge, a planted cycle), so a green run of the
real check means something.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "layers.toml"
PACKAGES = {"zkv_mlx": "zkv_mlx", "app": "zkv_mlx.app"}  # folder -> package name (app/ ships as zkv_mlx.app)


@dataclass(slots=True)
class Source:
    path: str  # relative to the repo root, e.g. "zkv_mlx/cache/policy.py"
    text: str


@dataclass(slots=True)
class Spec:
    layers: list[dict]
    exceptions: dict[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def load(cls, text: str) -> "Spec":
        raw = tomllib.loads(text)
        spec = cls(raw["layer"])
        for e in raw.get("exception", []):
            for to in [e["to"]] if isinstance(e["to"], str) else e["to"]:
                assert e.get("why"), f"exception {e['from']} -> {to} must say why"
                spec.exceptions[(e["from"], to)] = e["why"]
        return spec

    def layer_of(self, path: str) -> int:
        best, best_len = None, -1
        for i, layer in enumerate(self.layers):
            for p in layer["paths"]:
                hit = path == p or (p.endswith("/") and path.startswith(p))
                if hit and len(p) > best_len:
                    best, best_len = i, len(p)
        assert best is not None, f"{path} belongs to no layer in {SPEC.name}: add it to one"
        return best


def module_name(path: str) -> str:
    folder, *rest = Path(path).with_suffix("").parts
    if rest and rest[-1] == "__init__":
        rest = rest[:-1]
    return ".".join([PACKAGES[folder], *rest])


def repo_sources() -> dict[str, Source]:
    out = {}
    for folder in PACKAGES:
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            out[module_name(rel)] = Source(rel, f.read_text(encoding="utf-8"))
    return out


def _type_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (never run: no cycle, but still layered)."""
    out = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None) if isinstance(node, ast.If) else None
        if test is not None and (getattr(test, "id", None) or getattr(test, "attr", None)) == "TYPE_CHECKING":
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def imports(name: str, src: Source, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, type_only) for every import statement anywhere in the module, relative ones
    resolved. `from X import y` counts as an import of X.y when that is a module, else of X."""
    package = name if src.path.endswith("__init__.py") else name.rpartition(".")[0]
    tree = ast.parse(src.text, src.path)
    type_only = _type_only(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in type_only) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in known else base, node.lineno, id(node) in type_only))
    return out


def internal(target: str, known: set[str]) -> str | None:
    """The project module an import lands in (the longest known prefix), or None for a third-party one."""
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def check(spec: Spec, sources: dict[str, Source]) -> tuple[list[str], dict[str, set[str]]]:
    """Returns (problems, module graph of the imports that run). A problem names the file, line, both layers and
    the rule broken."""
    known = set(sources)
    graph: dict[str, set[str]] = {m: set() for m in sources}
    problems = []
    for name, src in sources.items():
        i = spec.layer_of(src.path)
        layer = spec.layers[i]
        for target, line, type_only in imports(name, src, known):
            where = f"{src.path}:{line}: {name} ({layer['name']}) imports {target}"
            bad = [f for f in layer.get("forbid", []) if target == f or target.startswith(f + ".")]
            if bad:
                problems.append(f"{where}: {layer['name']} must not import {bad[0]}")
            dst = internal(target, known)
            if dst is None or dst == name:
                continue
            if not type_only:
                graph[name].add(dst)
            j = spec.layer_of(sources[dst].path)
            allowed = spec.layers[j]["name"] in layer.get("only_below", [spec.layers[j]["name"]])
            if (name, dst) in spec.exceptions:
                continue
            if j < i:
                problems.append(f"{where} ({spec.layers[j]['name']}): imports must point down")
            elif j > i and not allowed:
                problems.append(f"{where} ({spec.layers[j]['name']}): {layer['name']} may use only "
                                f"{', '.join(layer['only_below'])} below it")
    return problems, graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


# -- the checker can fail --------------------------------------------------------------------------------------

TOY_SPEC = """
[[layer]]
name = "face"
paths = ["zkv_mlx/face.py"]
only_below = ["api"]
[[layer]]
name = "api"
paths = ["zkv_mlx/api.py"]
[[layer]]
name = "engine"
paths = ["zkv_mlx/engine/"]
[[layer]]
name = "cache"
paths = ["zkv_mlx/cache/"]
forbid = ["mlx"]
"""


def toy(**files: str) -> dict[str, Source]:
    return {module_name(p): Source(p, t) for p, t in
            {k.replace("__", "/").replace("_py", ".py"): v for k, v in files.items()}.items()}


def test_checker_passes_a_clean_toy():
    sources = toy(zkv_mlx__face_py="from . import api\n", zkv_mlx__api_py="from .engine import run\n",
                  zkv_mlx__engine__run_py="from ..cache import blocks\n", zkv_mlx__cache__blocks_py="import heapq\n")
    problems, graph = check(Spec.load(TOY_SPEC), sources)
    assert problems == [] and cycles(graph) == []


def test_checker_finds_a_planted_upward_import_inside_a_function():
    sources = toy(zkv_mlx__api_py="", zkv_mlx__engine__run_py="",
                  zkv_mlx__cache__blocks_py="def f():\n    from ..engine import run\n    return run\n")
    problems, _ = check(Spec.load(TOY_SPEC), sources)
    assert len(problems) == 1 and "zkv_mlx/cache/blocks.py:2" in problems[0] and "point down" in problems[0]


def test_checker_finds_a_face_reaching_past_the_api_and_mlx_in_cache():
    sources = toy(zkv_mlx__face_py="import zkv_mlx.engine.run\n", zkv_mlx__api_py="",
                  zkv_mlx__engine__run_py="", zkv_mlx__cache__blocks_py="import mlx.core as mx\n")
    problems, _ = check(Spec.load(TOY_SPEC), sources)
    assert len(problems) == 2
    assert any("face may use only api" in p for p in problems)
    assert any("cache must not import mlx" in p for p in problems)


def test_checker_finds_a_planted_cycle_and_an_exception_lifts_only_its_edge():
    sources = toy(zkv_mlx__api_py="", zkv_mlx__engine__a_py="from . import b\n",
                  zkv_mlx__engine__b_py="def later():\n    from .a import x\n",
                  zkv_mlx__engine__c_py="from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\n",
                  zkv_mlx__engine__d_py="from . import c\n",
                  zkv_mlx__face_py="from .engine import a\n")
    spec = Spec.load(TOY_SPEC + '[[exception]]\nfrom = "zkv_mlx.face"\nto = "zkv_mlx.engine.a"\nwhy = "a test"\n')
    problems, graph = check(spec, sources)
    assert problems == []
    assert cycles(graph) == [["zkv_mlx.engine.a", "zkv_mlx.engine.b"]]  # c <-> d is type-only


# -- the project -----------------------------------------------------------------------------------------------

def test_every_import_points_down_and_faces_use_the_public_api():
    problems, _ = check(Spec.load(SPEC.read_text(encoding="utf-8")), repo_sources())
    assert problems == [], "\n".join(problems)


def test_no_import_cycle_between_modules():
    _, graph = check(Spec.load(SPEC.read_text(encoding="utf-8")), repo_sources())
    assert cycles(graph) == []


def test_every_exception_is_still_needed():
    spec = Spec.load(SPEC.read_text(encoding="utf-8"))
    sources = repo_sources()
    _, graph = check(spec, sources)
    stale = [edge for edge in spec.exceptions if edge[1] not in graph.get(edge[0], ())]
    assert stale == [], f"remove these exceptions from {SPEC.name}: {stale}"
