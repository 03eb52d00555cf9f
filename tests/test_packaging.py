"""The wheel ships metal/ and app/ inside the package (zkv_mlx.metal, zkv_mlx.app) and the console script.

The project is copied to tmp_path first so the build never writes build/ or *.egg-info into the checkout.
"""

import configparser
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("dist")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    for name in ("zkv_mlx", "metal", "app"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    if importlib.util.find_spec("build") is not None:
        cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(out), str(src)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(src), timeout=300)
    assert r.returncode == 0, f"wheel build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    wheels = list(out.glob("zkv_mlx-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    with zipfile.ZipFile(wheels[0]) as z:
        yield z


def names(z: zipfile.ZipFile) -> list[str]:
    return z.namelist()


def test_metal_and_app_ship_inside_the_package(wheel):
    n = names(wheel)
    assert "zkv_mlx/metal/__init__.py" in n
    assert "zkv_mlx/app/__init__.py" in n
    assert any(x.startswith("zkv_mlx/metal/") for x in n)


def test_every_metal_source_ships(wheel):
    n = set(names(wheel))
    for f in (ROOT / "metal").iterdir():
        if f.suffix in (".metal", ".h", ".py"):
            assert f"zkv_mlx/metal/{f.name}" in n, f.name
    for f in (ROOT / "app").glob("*.py"):
        assert f"zkv_mlx/app/{f.name}" in n, f.name


def test_no_top_level_app_or_metal(wheel):
    tops = {x.split("/", 1)[0] for x in names(wheel)}
    assert "app" not in tops
    assert "metal" not in tops
    assert all(t == "zkv_mlx" or (t.startswith("zkv_mlx-") and t.endswith(".dist-info")) for t in tops), tops


def test_core_modules_ship(wheel):
    n = set(names(wheel))
    for mod in ("cli", "api", "config", "errors", "paths", "engine/engine", "models/loader", "models/gguf"):
        assert f"zkv_mlx/{mod}.py" in n, mod


def test_console_script_entry_point(wheel):
    ep = [x for x in names(wheel) if x.endswith(".dist-info/entry_points.txt")]
    assert len(ep) == 1
    text = wheel.read(ep[0]).decode()
    cp = configparser.ConfigParser()
    cp.read_string(text)
    assert cp["console_scripts"]["zkv-mlx"].strip() == "zkv_mlx.cli:main"
    assert "zkv-mlx = zkv_mlx.cli:main" in text
