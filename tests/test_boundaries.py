"""The layers import only downwards: schemas <- hqsam_core <- pipeline <- jobs (DEVELOPERS.md).

An AST scan of every module's imports, function-level ones included (that is where the heavy ones
live), and of `importlib.import_module("...")` calls with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# (folder, forbidden import prefixes, why)
FORBIDDEN = [
    (
        "hqsam_core",
        ("ray", "typer", "click", "hqsam.pipeline", "hqsam.jobs"),
        "the core runs without Ray or a CLI",
    ),
    ("pipeline", ("typer", "click", "hqsam.jobs"), "pipeline is a library: no CLI, no jobs"),
    ("schemas", ("hqsam",), "schemas import nothing of ours"),
    ("benchmarks", ("hqsam.jobs",), "benchmarks use hqsam_core and pipeline only"),
]
# Only jobs/cli.py, which assembles the app, may import other job modules.
JOBS_MAY_IMPORT = ("hqsam.jobs.options",)
JOBS_ASSEMBLER = "cli.py"


def imported_names(source: str, module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in `source`; `from a import b` gives `a.b`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module)
            found += [(node.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return sorted(found)


def _absolute(node: ast.ImportFrom, module: str) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".")[: -node.level]  # `module` is a module, not a package __init__
    return ".".join(package + ([node.module] if node.module else []))


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def package_name(folder: str) -> str:
    """The import name of a repository folder: hqsam's folders install under `hqsam`."""
    return folder if folder == "benchmarks" else f"hqsam.{folder}"


def modules(folder: str) -> list[tuple[Path, str]]:
    """(path, dotted module name) of each module in `folder`."""
    root = ROOT / folder
    return [
        (path, ".".join([package_name(folder), *path.relative_to(root).with_suffix("").parts]))
        for path in sorted(root.rglob("*.py"))
        if "__pycache__" not in path.parts
    ]


def violations(folder: str, allowed=lambda path, name: False, forbidden=()) -> list[str]:
    """Imports of `forbidden` prefixes by the modules of `folder`, except `allowed(path, name)` ones
    and a package's imports of itself (schemas of schemas); in jobs/, where the imports between job
    modules are the point, only a module's import of itself."""
    bad = []
    for path, module in modules(folder):
        own = module if folder == "jobs" else package_name(folder)
        for line, name in imported_names(path.read_text(), module):
            if _matches(name, forbidden) and not _matches(name, (own,)) and not allowed(path, name):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("folder, forbidden, why", FORBIDDEN, ids=[rule[0] for rule in FORBIDDEN])
def test_layer_imports_nothing_above_it(folder, forbidden, why):
    assert modules(folder), f"no modules found in {folder}/"
    assert violations(folder, forbidden=forbidden) == [], why


def test_job_modules_import_only_the_shared_options_from_jobs():
    def allowed(path: Path, name: str) -> bool:
        return path.name == JOBS_ASSEMBLER or _matches(name, JOBS_MAY_IMPORT)

    assert len(modules("jobs")) > 3
    assert violations("jobs", allowed, forbidden=("hqsam.jobs",)) == []


def test_the_scan_sees_function_level_relative_and_dynamic_imports():
    source = """
import os
from hqsam.hqsam_core import storage
def run():
    import ray.data
    from .options import fail
    from . import refine
    importlib.import_module("hqsam.jobs.train")
"""
    names = [name for _, name in imported_names(source, "hqsam.jobs.evaluate")]
    assert names == [
        "os",
        "hqsam.hqsam_core.storage",
        "ray.data",
        "hqsam.jobs.options.fail",
        "hqsam.jobs.refine",
        "hqsam.jobs.train",
    ]
    assert _matches("ray.data", ("ray",)) and not _matches("rayon", ("ray",))
