"""The library ships alone: its wheel holds only the ``gaussnewton`` package (no harness, no data,
no console script) and ``import gaussnewton`` pulls in none of the harness's dependencies.

The harness is the separate distribution ``gaussnewton-experiments`` in ``experiments/``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# what only the harness (or the tests) may import; the library's own dependencies are jax, optax,
# numpy (jax itself brings scipy along as a dependency but does not import it on `import jax`)
HARNESS_ONLY = ("matplotlib", "pandas", "rich", "scipy", "sklearn", "gymnax", "threadpoolctl")
CORE_REQUIREMENTS = {"jax", "optax", "numpy"}


def _build_tools_available() -> bool:
    if importlib.util.find_spec("wheel") is None or importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    return int(setuptools.__version__.split(".")[0]) >= 77  # SPDX `license = "..."` in pyproject


def _copy_repo(dst: Path) -> Path:
    """The files a build sees (pyproject, README, src, experiments), without build leftovers, so
    the wheel is built from a clean copy and the working tree gets no build/ or egg-info."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.pyc")
    dst.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dst / name)
    for name in ("src", "experiments"):
        shutil.copytree(ROOT / name, dst / name, ignore=skip)
    return dst


def _build_wheel(tmp: Path, project: str) -> zipfile.ZipFile:
    """Build the wheel of ``project`` ("." or "experiments") from a clean copy of the repo."""
    if not _build_tools_available():
        msg = "building the wheel needs setuptools>=77 and wheel: pip install -e '.[dev]'"
        if os.environ.get("CI"):
            pytest.fail(msg)  # the dev extra provides both; CI must not skip this check
        pytest.skip(msg)
    src = _copy_repo(tmp / "repo")
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    proc = subprocess.run(
        [*cmd, "-w", str(out), str(src / project)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return zipfile.ZipFile(wheels[0])


@pytest.fixture(scope="module")
def library_wheel(tmp_path_factory) -> zipfile.ZipFile:
    with _build_wheel(tmp_path_factory.mktemp("wheel"), ".") as zf:
        yield zf


def test_library_wheel_holds_only_the_library_code(library_wheel):
    names = library_wheel.namelist()
    dist_info = [n for n in names if ".dist-info/" in n]
    code = [n for n in names if ".dist-info/" not in n]
    assert any(n == "gaussnewton/__init__.py" for n in code)
    assert all(n.startswith("gaussnewton/") for n in code), code  # no second top-level package
    assert not [n for n in code if "experiments" in n]
    not_code = [n for n in code if not n.endswith((".py", "py.typed"))]
    assert not_code == [], f"data files in the library wheel: {not_code}"
    assert not [n for n in dist_info if n.endswith("entry_points.txt")], dist_info


def test_library_wheel_requires_only_the_core(library_wheel):
    meta_name = next(n for n in library_wheel.namelist() if n.endswith(".dist-info/METADATA"))
    meta = library_wheel.read(meta_name).decode()
    required = set()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            spec = line.split(":", 1)[1].strip()
            required.add(spec.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip())
    assert required == CORE_REQUIREMENTS, meta
    extras = {line.split(":", 1)[1].strip() for line in meta.splitlines()
              if line.startswith("Provides-Extra:")}  # fmt: skip
    assert extras == {"dev", "docs"}, extras  # test and API-site tools only


def test_import_gaussnewton_pulls_in_no_harness_dependency():
    code = (
        "import sys, gaussnewton\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({HARNESS_ONLY!r}))\n"
        "assert 'gaussnewton_experiments' not in sys.modules\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"import gaussnewton imported {proc.stdout.strip()}"


def test_harness_wheel_ships_the_data_and_the_command(tmp_path):
    from gaussnewton_experiments.datasets import TABLES

    with _build_wheel(tmp_path, "experiments") as zf:
        names = set(zf.namelist())
        entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = zf.read(entry).decode()
    assert {f"gaussnewton_experiments/data/{t.file}" for t in TABLES.values()} <= names
    assert "gaussnewton_experiments/rl/dqn.py" in names
    assert not [n for n in names if n.startswith("gaussnewton/")]  # the library is not bundled
    assert "gaussnewton-experiments = gaussnewton_experiments.cli:main" in entry_points


def test_harness_package_declares_its_data_and_command():
    """The harness's own pyproject ships the data sets and the `gaussnewton-experiments` command,
    and the data files sit in the package folder it names."""
    import tomllib

    cfg = tomllib.loads((ROOT / "experiments" / "pyproject.toml").read_text())
    assert cfg["project"]["name"] == "gaussnewton-experiments"
    assert cfg["project"]["scripts"] == {
        "gaussnewton-experiments": "gaussnewton_experiments.cli:main"
    }
    deps = {d.split(">")[0].split("=")[0].strip() for d in cfg["project"]["dependencies"]}
    assert {"gaussnewton", "matplotlib", "rich", "pandas", "scipy", "scikit-learn"} <= deps
    assert any(d.startswith("gymnax") for d in cfg["project"]["optional-dependencies"]["rl"])
    patterns = cfg["tool"]["setuptools"]["package-data"]["gaussnewton_experiments"]
    pkg = ROOT / "experiments" / "src" / "gaussnewton_experiments"
    shipped = {p.name for pat in patterns for p in pkg.glob(pat)}
    from gaussnewton_experiments.datasets import TABLES

    assert {t.file for t in TABLES.values()} <= shipped
