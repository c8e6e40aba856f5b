"""A built wheel installs hqsam under the one `hqsam` namespace and claims no generic import name."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("hqsam_core", "pipeline", "jobs", "schemas")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the build leaves nothing in the checkout)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in PACKAGES:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            ".",
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = out.glob("*.whl")
    return found


def test_wheel_holds_only_the_hqsam_namespace(wheel):
    pyproject = (ROOT / "pyproject.toml").read_text()
    project = {key: re.search(rf'^{key} = "([^"]+)"', pyproject, re.M)[1] for key in ("name", "version")}
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = f"hqsam_refine-{project['version']}.dist-info"
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert project["name"] == "hqsam-refine" and "Name: hqsam-refine\n" in metadata
    assert wheel.name.startswith(f"hqsam_refine-{project['version']}-")
    assert {name.split("/")[0] for name in names} == {"hqsam", dist_info}
    code = [name for name in names if not name.startswith(dist_info)]
    assert {name.split("/")[1] for name in code} == set(PACKAGES)  # no top-level pipeline/, jobs/, ...
    assert "hqsam/__init__.py" not in names  # a namespace: nothing owns `hqsam` itself
    expected = {
        f"hqsam/{name}/{path.relative_to(ROOT / name).as_posix()}"
        for name in PACKAGES
        for path in (ROOT / name).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert set(code) == expected  # every module, and nothing else (no data, no caches)
    assert "[console_scripts]\nhqsam = hqsam.jobs.cli:app" in entry_points


def test_installed_wheel_imports_as_hqsam_and_leaves_pipeline_alone(wheel, tmp_path):
    target, empty = tmp_path / "site", tmp_path / "cwd"
    empty.mkdir()
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    probe = (
        "import importlib.util, hqsam.pipeline.stage, hqsam.jobs.cli\n"
        "print(hqsam.pipeline.stage.__file__)\n"
        "print(importlib.util.find_spec('pipeline'), importlib.util.find_spec('jobs'),"
        " importlib.util.find_spec('schemas'), importlib.util.find_spec('hqsam_core'))\n"
        "import pipeline\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=empty,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stdout.splitlines()
    assert lines[:2] == [str(target / "hqsam" / "pipeline" / "stage.py"), "None None None None"], (
        result.stderr
    )
    assert result.returncode == 1 and "ModuleNotFoundError: No module named 'pipeline'" in result.stderr
