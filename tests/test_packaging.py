"""tuner as installed from a wheel (what ``pip install .``, pipx and PyPI give a user, which an editable install does
not show): every module and the shipped catalogs are inside the package, and the installed tuner plans from them
outside the checkout. ``tuner --version`` reports the installed distribution's version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

import tuner

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)], check=True,
                   capture_output=True, timeout=600)
    (found,) = out.glob("tuner-*.whl")
    return found


def test_the_wheel_holds_every_module_and_the_shipped_catalogs(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "tuner").rglob("*.py")}
    assert modules - names == set()  # a sub-package setup.py does not find shows here
    catalogs = {"tuner/catalogs/" + p.relative_to(REPO / "profiles").as_posix()
                for pattern in ("*.yaml", "*.json") for p in (REPO / "profiles").rglob(pattern)}
    assert {"tuner/catalogs/gpus.yaml", "tuner/catalogs/models/_recipes.yaml",
            "tuner/catalogs/models/qwen3.5-35b-a3b.yaml"} <= catalogs
    assert catalogs - names == set()
    assert "tuner/py.typed" in names
    assert f"tuner-{tuner.__version__}.dist-info/METADATA" in names


def test_the_installed_wheel_plans_from_its_own_catalogs_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "TUNER_CATALOG_DIR"}
    env["PYTHONPATH"] = str(site)  # ahead of the editable install; the dependencies come from this environment
    where = subprocess.run(
        [sys.executable, "-c", "import tuner, tuner.paths; print(tuner.__file__); print(tuner.paths.catalog_dir())"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True, timeout=60).stdout.split()
    assert where == [str(site / "tuner" / "__init__.py"), str(site / "tuner" / "catalogs")]
    for args in (["recommend", "--gpu", "rtx-4090", "--json"],
                 ["estimate", "qwen3.5-35b-a3b:Q4_K_M", "--gpu", "rtx-4090", "--json"]):
        done = subprocess.run([sys.executable, "-m", "tuner", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)


def test_version_prints_the_installed_distribution_version() -> None:
    done = subprocess.run([sys.executable, "-m", "tuner", "--version"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"tuner {version('tuner')}\n", "")
    assert version("tuner") == tuner.__version__  # the metadata is built from tuner.__version__
