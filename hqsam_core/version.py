"""Which code made a result: hqsam's version, its git revision and the versions it ran with.

`versions()` goes into OUT/summary.json and the training records; `hqsam --version` prints it. Nothing
here imports torch or Ray: a module already imported reports its own `__version__` (torch's names its
CUDA build, e.g. 2.4.1+cu121), any other its installed distribution's version.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

DISTRIBUTION = "hqsam-refine"
# pyproject.toml's version, for our code run without its distribution installed (e.g. shipped to a
# Ray cluster as py_modules); tests/test_version.py keeps the two equal.
VERSION = "0.1.0"
# The folder above hqsam_core: the repository root when hqsam runs from a checkout.
_CHECKOUT = Path(__file__).resolve().parent.parent


def versions() -> dict[str, str | bool | None]:
    """{version, git_revision, git_dirty, torch, ray, python}; None where unknown: git_* outside a git
    checkout (or without git), ray when it is not installed."""
    revision, dirty = git_revision()
    return {
        "version": hqsam_version(),
        "git_revision": revision,
        "git_dirty": dirty,
        "torch": module_version("torch"),
        "ray": module_version("ray"),
        "python": platform.python_version(),
    }


def hqsam_version() -> str:
    """The installed distribution's version, or VERSION when the code runs without it."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return VERSION


def module_version(name: str) -> str | None:
    """The version of a module or package, without importing it; None when it is not installed."""
    module = sys.modules.get(name)
    if getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def git_revision(checkout: Path = _CHECKOUT) -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes to tracked files) of the checkout our code runs from, or
    (None, None) when it does not run from one or git cannot tell."""
    if not (checkout / ".git").exists():  # not, e.g., the repository a virtualenv happens to sit in
        return None, None
    try:
        commit = _git(checkout, "rev-parse", "HEAD")
        changes = _git(checkout, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # no git, not a repository, unsafe owner, hung
        return None, None
    return commit, bool(changes)


def _git(checkout: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout.strip()
