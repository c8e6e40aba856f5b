"""hqsam_core.version: what a result records about the code that made it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hqsam.hqsam_core import version
from hqsam.hqsam_core.version import VERSION, git_revision, module_version, versions

ROOT = Path(__file__).resolve().parents[1]


def test_versions_names_hqsam_git_torch_ray_and_python() -> None:
    import torch

    info = versions()
    assert set(info) == {"version", "git_revision", "git_dirty", "torch", "ray", "python"}
    assert info["version"] == VERSION and info["torch"] == str(torch.__version__)
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["ray"] == module_version("ray") and info["ray"]


def test_the_fallback_version_is_pyprojects() -> None:
    project = (ROOT / "pyproject.toml").read_text().split("[project]")[1].split("\n[")[0]
    assert re.search(rf'^version = "{re.escape(VERSION)}"$', project, re.M)
    assert re.search(rf'^name = "{re.escape(version.DISTRIBUTION)}"$', project, re.M)


def test_a_module_that_is_not_installed_has_no_version() -> None:
    assert module_version("no_such_module_hqsam") is None


def _git(folder: Path, *args: str) -> str:
    command = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def test_git_revision_of_a_checkout_and_its_uncommitted_changes(tmp_path: Path) -> None:
    if not shutil.which("git"):
        pytest.skip("no git")
    (tmp_path / "a.txt").write_text("a")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "a")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert git_revision.__wrapped__(tmp_path) == (head, False)
    (tmp_path / "a.txt").write_text("b")
    assert git_revision.__wrapped__(tmp_path) == (head, True)
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "untracked.txt").write_text("c")  # not the code that ran
    assert git_revision.__wrapped__(tmp_path) == (head, False)


def test_git_revision_is_none_outside_a_checkout_or_without_git(tmp_path: Path, monkeypatch) -> None:
    assert git_revision.__wrapped__(tmp_path) == (None, None)
    (tmp_path / ".git").mkdir()  # looks like a checkout, but git disowns it
    assert git_revision.__wrapped__(tmp_path) == (None, None)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # git is not installed
    assert git_revision.__wrapped__(ROOT) == (None, None)


def test_versions_import_neither_torch_nor_ray() -> None:
    code = (
        "import sys; from hqsam.hqsam_core.version import versions; info = versions(); "
        "assert info['torch'] and info['ray'], info; "
        "assert not {'torch', 'ray'} & set(sys.modules), sorted({'torch', 'ray'} & set(sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
