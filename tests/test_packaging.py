"""The wheel: `python -m build` makes one with the generated code, the test vectors, py.typed and the reference
TOMLs, and `parley demo` runs from it installed in a fresh venv, away from the source tree.

Offline: the wheel is built with the installed setuptools (`--no-isolation`) from a copy of the sources, so
the work tree gets no build/ or egg-info; the fresh venv has no pip of its own (this environment's pip installs
the wheel into it, `--no-deps --no-index`) and reaches the dependencies through a .pth file naming this
environment's site-packages. A .pth file's directories are added without their own .pth files being read, so
this environment's editable install of the project is not — the test checks that `agent` comes from the venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "parley", "reference_biller", "reference_consumer")
EXPECTED = {
    "agent/py.typed",
    "agent/data/vectors.json",
    "parley/py.typed",
    "parley/v1/__init__.py",
    "parley/v1/biller_service_pb2.py",
    "parley/v1/biller_service_pb2.pyi",
    "parley/v1/biller_service_pb2_grpc.py",
    "parley/v1/biller_service_pb2_grpc.pyi",
    "parley/v1/envelope_pb2.py",
    "reference_biller/sample.toml",
    "reference_biller/telecom.toml",
    "reference_consumer/sample.toml",
}


def _copy_sources(destination: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, destination / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, destination / package, ignore=ignore)


def _run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done


def test_the_wheel_carries_everything_and_parley_demo_runs_from_a_fresh_venv(tmp_path: Path) -> None:
    pytest.importorskip("build")
    source, dist, elsewhere = tmp_path / "source", tmp_path / "dist", tmp_path / "elsewhere"
    for directory in (source, dist, elsewhere):
        directory.mkdir()
    _copy_sources(source)
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, source, cwd=tmp_path)
    (wheel,) = dist.glob("parley-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    assert not EXPECTED - names, sorted(EXPECTED - names)
    modules = {str(path.relative_to(source)) for package in PACKAGES for path in (source / package).rglob("*.py")}
    assert modules <= names, sorted(modules - names)  # every module of every package
    assert not any(name.startswith(("tests/", "scripts/", "proto/")) for name in names)
    (entry_points,) = (name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "parley = agent.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    (metadata,) = (name for name in names if name.endswith(".dist-info/METADATA"))
    extras = {
        line.split(":", 1)[1].strip()
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Provides-Extra:")
    }
    assert {"uvloop", "postgres", "otel"} <= extras

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--quiet",
        "--no-deps",
        "--no-index",
        wheel,
        cwd=tmp_path,
    )
    purelib = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip()
    )
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "_parley_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")

    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "PARLEY_"))}
    where = _run(
        python, "-c", "import agent, parley.v1, reference_biller; print(agent.__file__)", cwd=elsewhere, env=env
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), "the installed wheel, not the source tree"
    check = "from agent import vectors; from reference_biller.config import load_config; load_config(); vectors.load()"
    _run(python, "-c", check, cwd=elsewhere, env=env)  # the shipped vectors and sample TOML, from the wheel

    demo = _run(venv / "bin" / "parley", "demo", "--out", elsewhere / "bundles", cwd=elsewhere, env=env)
    assert list((elsewhere / "bundles").rglob("*.json")), demo.stdout
