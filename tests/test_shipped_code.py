"""The cluster files hold for a user who has only this repository: a job runs hqsam from the code
shipped with it, on a real local Ray head whose Python has hqsam's dependencies and NOTHING of hqsam.

Both ways the code travels are run: `hqsam ... --address` (the client ships its code as py_modules:
cluster.yaml's way) and a py_modules zip URI written by deploy/package_code.py under the KubeRay
manifest's entrypoint (deploy/kuberay-refine-job.yaml's way). The files themselves are checked offline
in tests/test_cluster.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from hqsam.pipeline.read_refined import ROWS_FOLDER
from tests.conftest import ROOT, shared_fixture
from tests.test_submit import clean_env, running_head

pytestmark = pytest.mark.slow

# What a job imports: where hqsam comes from, in the driver and in a worker.
WHERE_HQSAM_COMES_FROM = """
import json, ray, hqsam, hqsam.jobs.cli
@ray.remote
def worker_side():
    import hqsam.pipeline.stage
    return hqsam.pipeline.stage.__file__
ray.init()
print("PROBE " + json.dumps({
    "path": list(hqsam.__path__), "cli": hqsam.jobs.cli.__file__, "worker": ray.get(worker_side.remote())
}))
"""


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A Python that imports Ray, torch and every other dependency of hqsam, but not hqsam.

    A venv of the base interpreter (system site-packages) whose `.pth` names the project venv's
    site-packages folder: a path line adds the folder without running the `.pth` files inside it,
    so the editable install's finder, the only way to hqsam there, never loads."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run(
        [str(base), "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True
    )
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "hqsam-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = bare_env(python)
    deps = subprocess.run(
        [str(python), "-c", "import ray, torch, segment_anything, pycocotools, typer"], env=env, cwd=venv
    )
    assert deps.returncode == 0, "the bare Python must import hqsam's dependencies"
    ours = subprocess.run(
        [str(python), "-c", "import hqsam"], env=env, cwd=venv, capture_output=True, text=True
    )
    if ours.returncode == 0 or "No module named 'hqsam'" not in ours.stderr:
        pytest.skip("hqsam is importable without the editable finder here (not an editable install)")
    return python


def bare_env(python: Path) -> dict[str, str]:
    """The environment of the "cluster": its `python` first on PATH, no PYTHONPATH, no venv of ours."""
    env = {k: v for k, v in clean_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def bare_head(bare_python: Path):
    with running_head([str(bare_python), "-m", "ray.scripts.scripts"], bare_env(bare_python)) as url:
        yield url


def run_job(url: str, entrypoint: str, runtime_env: dict, timeout_s: float = 420) -> str:
    """Submit, wait for the end, return the logs; the job must succeed."""
    from ray.job_submission import JobSubmissionClient

    from hqsam.pipeline.submission import TERMINAL

    jobs = JobSubmissionClient(url)
    job_id = jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    deadline = time.time() + timeout_s
    while time.time() < deadline and str(jobs.get_job_status(job_id)) not in TERMINAL:
        time.sleep(1.0)
    logs = jobs.get_job_logs(job_id)
    assert str(jobs.get_job_status(job_id)) == "SUCCEEDED", logs
    return logs


def probe(logs: str) -> dict:
    return json.loads(next(line for line in logs.splitlines() if line.startswith("PROBE "))[6:])


def assert_shipped(found: dict) -> None:
    """hqsam came from Ray's unpacked py_modules only, in the driver and in a worker."""
    assert found["path"] and all("runtime_resources" in path for path in found["path"]), found
    for key in ("cli", "worker"):
        assert "runtime_resources" in found[key] and not found[key].startswith(str(ROOT)), found


def test_address_submission_runs_on_a_head_without_hqsam(bare_head, bare_python, tmp_path, tiny_checkpoint):
    from hqsam.pipeline.submission import runtime_env, staged_code

    with staged_code() as code:
        entrypoint = f"python -c {shlex.quote(WHERE_HQSAM_COMES_FROM)}"  # the cluster's `python`
        assert_shipped(probe(run_job(bare_head, entrypoint, runtime_env([], code))))

    annotations = shared_fixture("labelme-voc") / "annotations.json"
    out = tmp_path / "out"
    sha256 = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    env = clean_env() | {"HQSAM_CLUSTER_PYTHON": str(bare_python)}  # the cluster's Python, by name
    args = ["refine", str(annotations), "--out", str(out), "--checkpoint", str(tiny_checkpoint)]
    args += ["--checkpoint-sha256", sha256, "--device", "cpu", "--no-progress", "--address", bare_head]
    result = subprocess.run(
        [sys.executable, "-m", "hqsam.jobs.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "refined ok" in result.stdout and "succeeded" in result.stderr
    assert pq.read_table(out / ROWS_FOLDER).num_rows == 12
    assert json.loads((out / "summary.json").read_text())["checkpoint_sha256"] == sha256


def test_kuberay_way_code_zip_under_the_manifest_entrypoint(bare_head, tmp_path, tiny_checkpoint):
    from hqsam.pipeline.submission import write_code_archive

    written = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "package_code.py"), str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        check=True,
    )
    archive = Path(written.stdout.strip())
    assert archive.is_file() and write_code_archive(tmp_path / "again").name == archive.name  # by content
    rayjob = yaml.safe_load((ROOT / "deploy" / "kuberay-refine-job.yaml").read_text())
    manifest_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert set(manifest_env) == {"py_modules", "env_vars"}  # no pip: the image has the dependencies
    # The manifest's runtime_env, its code URI pointing at this zip (file:// where it says s3://).
    runtime_env = manifest_env | {
        "py_modules": [archive.as_uri()],
        "env_vars": manifest_env["env_vars"] | {"HQSAM_CACHE": str(tmp_path / "cache")},
    }
    assert_shipped(probe(run_job(bare_head, f"python -c {shlex.quote(WHERE_HQSAM_COMES_FROM)}", runtime_env)))

    command = shlex.split(rayjob["spec"]["entrypoint"])
    program = command[: command.index("refine") + 1]
    assert program == ["python", "-m", "hqsam.jobs.cli", "refine"]
    annotations = shared_fixture("labelme-voc") / "annotations.json"
    out = tmp_path / "out"
    local = [str(annotations), "--out", str(out), "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    logs = run_job(bare_head, shlex.join([*program, *local, "--limit", "2", "--no-progress"]), runtime_env)
    assert "refined ok" in logs
    assert json.loads((out / "summary.json").read_text())["complete"] is True
