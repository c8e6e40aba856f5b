"""The GPU check (benchmarks/gpu_check.py) rehearsed on the CPU: every step runs and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_dry_run_takes_every_step_and_writes_its_report(tmp_path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + log[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and report["device_name"].startswith("CPU")
    assert {name: step["status"] for name, step in report["steps"].items()} == {
        "tests": "passed",
        "vit_tiny": "passed",
        "chain": "passed",
    }
    # the CUDA tests were collected and skipped here, none failed
    tests = report["tests"]
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"] and tests["failed"] == []
    (refiner,) = report["refiner"]
    assert refiner["model"] == "vit_tiny" and {"official", "ours_fp32"} <= set(refiner["contestants"])
    chain = report["chain"]
    assert chain["rows_written"] == chain["images"] == 2
    assert chain["masks_refined"] == chain["annotations"] == 14
    assert chain["chain_images_per_s"] > 0 and chain["bare_refiner_images_per_s"] > 0
    table = (out / "gpu_check.md").read_text()
    assert "| tests | passed |" in table and "| ours_fp32 |" in table and "whole chain" in table
    assert len(list(out.iterdir())) <= 8  # what a GPU machine's OUT brings back


def _wheel(folder: Path, name: str, source: str) -> Path:
    """A minimal pure-Python wheel of one module `name` whose __init__ is `source`."""
    import base64
    import hashlib
    import zipfile

    files = {
        f"{name}/__init__.py": source,
        f"{name}-0.1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
        f"{name}-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{name}-0.1.dist-info/RECORD"] = "\n".join([*record, f"{name}-0.1.dist-info/RECORD,,"]) + "\n"
    path = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_missing_modules_are_installed_from_the_wheels_brought_along(tmp_path) -> None:
    from benchmarks.gpu_check import prepare_environment

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "hqsam_gpu_check_probe", "VALUE = 41 + 1\n")
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match="missing hqsam_gpu_check_probe: pass --wheels"):
        prepare_environment(None, work, ("hqsam_gpu_check_probe",))
    env, done = prepare_environment(wheels, work, ("hqsam_gpu_check_probe", "json"))
    assert done == [f"installed hqsam_gpu_check_probe from {wheels}"]  # json is there already
    probe = "import hqsam_gpu_check_probe, hqsam.pipeline; print(hqsam_gpu_check_probe.VALUE)"
    printed = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert printed.stdout.strip() == "42", printed.stderr
