"""`--address` submission and `hqsam jobs` against a real local Ray head (`ray start --head`).

The head runs in its own process group with its own --temp-dir and free ports, so it neither sees nor
is seen by the in-process `ray_session` fixture; teardown ends exactly its processes, by id.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hqsam.pipeline.read_refined import ROWS_FOLDER
from tests.conftest import ROOT, shared_fixture

HEAD_START_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "HQSAM_IN_RAY_JOB"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    return env


def _descendants(pid: int) -> list[int]:
    """pid and all its descendants, from /proc (Linux), children before their exit can orphan them."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _end(pids: list[int], grace_s: float = 15.0) -> None:
    """SIGTERM these processes (ours, by id), then SIGKILL whatever is left after grace_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head with the dashboard (the job server) on free ports; yields its dashboard URL."""
    missing = subprocess.run(
        [sys.executable, "-c", "import ray.dashboard.optional_deps"], capture_output=True, text=True
    )
    if missing.returncode:
        reason = (missing.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"the Ray job server needs ray[default] (dashboard deps): {reason}")
    with running_head([str(Path(sys.executable).with_name("ray"))], clean_env()) as url:
        yield url


@contextlib.contextmanager
def running_head(ray_cli: list[str], env: dict[str, str]) -> Iterator[str]:
    """`ray start --head` run by `ray_cli` (the Ray CLI of some Python) in its own session; yields
    the dashboard URL and ends exactly its processes."""
    # Short: Ray's unix sockets live under --temp-dir and their paths are limited to ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    gcs_port, dashboard_port, agent_port, client_port = (free_port() for _ in range(4))
    url = f"http://127.0.0.1:{dashboard_port}"
    log = open(temp_dir / "head.log", "wb")  # closed at teardown
    head = subprocess.Popen(
        [
            *ray_cli,
            "start",
            "--head",
            "--block",
            f"--port={gcs_port}",
            f"--dashboard-port={dashboard_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-agent-listen-port={agent_port}",
            f"--ray-client-server-port={client_port}",
            "--num-cpus=2",
            f"--object-store-memory={512 * 2**20}",
            "--include-dashboard=true",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: nothing of ours or others' shares it
    )
    try:
        _wait_for_job_server(head, url, temp_dir / "head.log")
        yield url
    finally:
        _end(_descendants(head.pid))
        head.wait(timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_server(head: subprocess.Popen, url: str, log: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + HEAD_START_S
    while time.time() < deadline:
        if head.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            pytest.skip(f"`ray start --head` exited with {head.returncode}:\n{tail}")
        try:
            JobSubmissionClient(url).list_jobs()
            return
        except Exception:
            time.sleep(1.0)
    _end(_descendants(head.pid))
    pytest.skip(f"the Ray job server at {url} did not answer within {HEAD_START_S} s")


def hqsam(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, from the project root, with a clean Ray environment."""
    return subprocess.run(
        [sys.executable, "-m", "hqsam.jobs.cli", *args],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_refine_job_succeeds_with_logs_and_outputs(ray_head, tmp_path, tiny_checkpoint):
    annotations = shared_fixture("labelme-voc") / "annotations.json"
    out = tmp_path / "out"
    result = hqsam(
        "refine",
        os.path.relpath(annotations, ROOT),  # relative on purpose: the job must resolve it as here
        "--out",
        str(out),
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--no-progress",
        "--address",
        ray_head,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Running entrypoint for job" in result.stdout  # the job's own log, followed
    assert "refined ok" in result.stdout and "summary" in result.stdout
    assert "succeeded" in result.stderr
    rows = pq.read_table(out / ROWS_FOLDER).num_rows
    assert rows == 12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["annotations_written"] == 12 and summary["complete"]


@pytest.mark.slow
def test_failing_job_exits_nonzero_with_its_error(ray_head, tmp_path):
    annotations = shared_fixture("labelme-voc") / "annotations.json"
    result = hqsam(
        "refine",
        str(annotations),
        "--out",
        str(tmp_path / "out"),
        "--checkpoint",
        str(tmp_path / "no-such-weights.pth"),
        "--device",
        "cpu",
        "--address",
        ray_head,
    )
    assert result.returncode != 0
    assert "no-such-weights.pth does not exist" in result.stdout  # the job's error, from its log
    assert "failed" in result.stderr


# What a job imports: the code shipped with it (py_modules), never the checkout or an installed copy.
SHIPPED_PROBE = """
import importlib.util, json, hqsam.jobs.cli, hqsam.pipeline.stage
print("PROBE " + json.dumps({
    "cli": hqsam.jobs.cli.__file__,
    "stage": hqsam.pipeline.stage.__file__,
    "pipeline_importable": importlib.util.find_spec("pipeline") is not None,
}))
"""


@pytest.mark.slow
def test_submitted_job_imports_the_code_shipped_with_it(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from hqsam.pipeline.submission import TERMINAL, package_folders, runtime_env, staged_code

    jobs = JobSubmissionClient(ray_head)
    command = (
        f"cd {shlex.quote(str(tmp_path))} && {shlex.quote(sys.executable)} -c {shlex.quote(SHIPPED_PROBE)}"
    )
    with staged_code() as code:
        job_id = jobs.submit_job(entrypoint=command, runtime_env=runtime_env([], code))
    deadline = time.time() + 180
    while time.time() < deadline and str(jobs.get_job_status(job_id)) not in TERMINAL:
        time.sleep(0.5)
    logs = jobs.get_job_logs(job_id)
    assert str(jobs.get_job_status(job_id)) == "SUCCEEDED", logs
    probe = json.loads(next(line for line in logs.splitlines() if line.startswith("PROBE "))[6:])
    local = [str(folder.resolve()) for folder in package_folders().values()] + [str(ROOT.resolve())]
    for name, relative in (("cli", "jobs/cli.py"), ("stage", "pipeline/stage.py")):
        shipped = Path(probe[name])
        assert "py_modules" in str(shipped) and shipped.as_posix().endswith(f"/hqsam/{relative}")
        assert not str(shipped.resolve()).startswith(tuple(local))
        assert shipped.read_bytes() == (ROOT / relative).read_bytes()  # the head shares this disk
    assert probe["pipeline_importable"] is False  # hqsam owns no top-level `pipeline`


@pytest.mark.slow
def test_jobs_list_status_logs_stop(ray_head, tmp_path, tiny_checkpoint, monkeypatch):
    # In-process (CliRunner): every `hqsam` subprocess would pay the torch import again.
    from ray.job_submission import JobSubmissionClient

    from hqsam.jobs.cli import app

    for name in ("RAY_ADDRESS", "HQSAM_IN_RAY_JOB", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()
    annotations = shared_fixture("labelme-voc") / "annotations.json"
    args = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--no-progress"]
    submitted = runner.invoke(
        app,
        [
            "refine",
            str(annotations),
            "--out",
            str(tmp_path / "out"),
            *args,
            "--address",
            ray_head,
            "--detach",
        ],
    )
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_")

    listed = runner.invoke(app, ["jobs", "list", "--address", ray_head])
    assert listed.exit_code == 0 and job_id in listed.stdout and "hqsam refine" in listed.stdout

    jobs = JobSubmissionClient(ray_head)
    deadline = time.time() + 120
    while time.time() < deadline and str(jobs.get_job_status(job_id)) == "PENDING":
        time.sleep(0.5)
    status = runner.invoke(app, ["jobs", "status", job_id, "--address", ray_head])
    assert status.exit_code == 0 and "RUNNING" in status.stdout, status.output

    stopped = runner.invoke(app, ["jobs", "stop", job_id, "--address", ray_head])
    assert stopped.exit_code == 0, stopped.output
    assert f"{job_id} STOPPED" in stopped.stdout
    assert str(jobs.get_job_status(job_id)) == "STOPPED"

    unknown = runner.invoke(app, ["jobs", "status", "raysubmit_nosuchjob", "--address", ray_head])
    assert unknown.exit_code == 2 and "error:" in unknown.output and "Traceback" not in unknown.output

    logs = runner.invoke(app, ["jobs", "logs", job_id, "--address", ray_head])
    assert logs.exit_code == 0 and f"Running entrypoint for job {job_id}" in logs.stdout
    followed = runner.invoke(app, ["jobs", "logs", job_id, "--follow", "--address", ray_head])
    assert followed.exit_code == 1  # a stopped job is not a success
    assert f"job {job_id} stopped" in followed.stderr


# Without a head: what is submitted, and that a job never re-submits itself.


def test_submitted_argv_keeps_what_the_user_gave(monkeypatch):
    from hqsam.jobs import cli
    from hqsam.pipeline import submission

    calls = []
    monkeypatch.setattr(
        submission, "submit", lambda argv, address, **kw: calls.append((argv, address, kw)) or 0
    )
    monkeypatch.delenv("HQSAM_IN_RAY_JOB", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    result = CliRunner().invoke(
        cli.app,
        [
            "refine",
            "s3://bucket/ann.json",
            "--out",
            "s3://bucket/out",
            "--actors",
            "1:4",
            "--no-progress",
            "--detach",
            "--forward-env",
            "AWS_ENDPOINT_URL",
        ],
        env={"RAY_ADDRESS": "http://10.0.0.1:8265"},
    )
    assert result.exit_code == 0, result.output
    argv, address, kw = calls[0]
    assert address == "http://10.0.0.1:8265"
    assert argv == [
        "refine",
        "--out",
        "s3://bucket/out",
        "--actors",
        "1:4",
        "--no-progress",
        "--",
        "s3://bucket/ann.json",
    ]
    assert kw == {"detach": True, "forward_env": ["AWS_ENDPOINT_URL"]}


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["train", "--data", "s3://b/hq::weight=2", "--data", "s3://b/coco.json", "--out", "s3://b/run"],
            ["train", "--data", "s3://b/hq::weight=2", "--data", "s3://b/coco.json", "--out", "s3://b/run"],
        ),
        (
            [
                "evaluate",
                "--data",
                "s3://b/val",
                "--out",
                "s3://b/r.json",
                "--no-hq-token-only",
                "--limit",
                "5",
            ],
            [
                "evaluate",
                "--data",
                "s3://b/val",
                "--out",
                "s3://b/r.json",
                "--no-hq-token-only",
                "--limit",
                "5",
            ],
        ),
    ],
)
def test_train_and_evaluate_submit_too(monkeypatch, args, expected):
    from hqsam.jobs import cli
    from hqsam.pipeline import submission

    calls = []
    monkeypatch.setattr(submission, "submit", lambda argv, address, **kw: calls.append(argv) or 0)
    monkeypatch.delenv("HQSAM_IN_RAY_JOB", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    result = CliRunner().invoke(cli.app, [*args, "--address", "http://10.0.0.1:8265"])
    assert result.exit_code == 0, result.output
    assert calls == [expected]


def test_local_path_to_a_remote_cluster_warns(monkeypatch, tiny_checkpoint):
    from hqsam.jobs import cli
    from hqsam.pipeline import submission

    monkeypatch.setattr(submission, "submit", lambda argv, address, **kw: 0)
    monkeypatch.delenv("HQSAM_IN_RAY_JOB", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    args = ["refine", "s3://b/ann.json", "--out", "s3://b/out", "--checkpoint", str(tiny_checkpoint)]
    remote = CliRunner().invoke(cli.app, [*args, "--address", "http://10.0.0.1:8265"])
    assert remote.exit_code == 0
    assert f"--checkpoint {tiny_checkpoint}" in remote.output and "warning" in remote.output
    local = CliRunner().invoke(cli.app, [*args, "--address", "http://127.0.0.1:8265"])
    assert local.exit_code == 0 and "warning" not in local.output


def test_inside_a_job_the_command_runs_in_place(monkeypatch, tmp_path):
    from hqsam.jobs import cli
    from hqsam.pipeline import submission

    monkeypatch.setattr(submission, "submit", lambda *a, **kw: pytest.fail("re-submitted from inside a job"))
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray sets for every job driver
    result = CliRunner().invoke(
        cli.app,
        [
            "refine",
            str(tmp_path / "missing.json"),
            "--out",
            str(tmp_path / "out"),
            "--checkpoint",
            str(tmp_path / "missing.pth"),
        ],
        env={"RAY_ADDRESS": "10.0.0.1:6379"},  # Ray's job supervisor sets it to the GCS address
    )
    # It ran here: the local run's first check (the annotation file) answered, nothing was submitted.
    assert result.exit_code == 2 and "missing.json does not exist" in result.output


def test_entrypoint_names_a_checked_interpreter(monkeypatch):
    from hqsam.pipeline.submission import entrypoint

    monkeypatch.delenv("HQSAM_CLUSTER_PYTHON", raising=False)
    remote = entrypoint(["refine", "--", "s3://b/a.json"], "http://10.0.0.1:8265")
    assert remote.startswith("for py in python3 python; do")
    assert "import ray, hqsam.jobs.cli" in remote and "exit 127" in remote
    local = entrypoint(["refine"], "http://127.0.0.1:8265")
    assert sys.executable in local and local.startswith("cd ")
    monkeypatch.setenv("HQSAM_CLUSTER_PYTHON", "/opt/py/bin/python")
    assert entrypoint(["refine"], "ray://head:10001") == "/opt/py/bin/python -m hqsam.jobs.cli refine"


def test_runtime_env_ships_only_our_code_and_redacts_forwarded_values(monkeypatch):
    from hqsam.pipeline.submission import PACKAGES, describe_runtime_env, runtime_env, staged_code

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    with staged_code() as code:
        env = runtime_env(["AWS_SECRET_ACCESS_KEY"], code)
        staged = Path(code)
        shipped = sorted(str(path.relative_to(staged)) for path in staged.rglob("*") if path.is_file())
        assert staged.name == "hqsam" and not (staged / "__init__.py").exists()  # a namespace, as installed
        # Exactly the .py files of the four packages (no __pycache__, no data, nothing of the checkout).
        expected = sorted(
            f"{name}/{path.relative_to(ROOT / name)}"
            for name in PACKAGES
            for path in (ROOT / name).rglob("*.py")
            if "__pycache__" not in path.parts
        )
        assert (
            shipped == expected and "jobs/cli.py" in shipped and "hqsam_core/testing/__init__.py" in shipped
        )
        assert (staged / "pipeline" / "submission.py").read_bytes() == (
            ROOT / "pipeline" / "submission.py"
        ).read_bytes()
    assert not staged.exists()  # the staging folder is temporary
    assert env["py_modules"] == [code]
    assert "working_dir" not in env and "excludes" not in env  # nothing of the checkout is uploaded
    assert env["env_vars"] == {"HQSAM_IN_RAY_JOB": "1", "AWS_SECRET_ACCESS_KEY": "very-secret"}
    assert "very-secret" not in describe_runtime_env(env)
    assert "AWS_SECRET_ACCESS_KEY=***" in describe_runtime_env(env)
    assert "py_modules hqsam" in describe_runtime_env(env)


def test_unset_forwarded_variable_and_detach_without_address_are_user_errors(monkeypatch, tmp_path):
    from hqsam.jobs import cli
    from hqsam.pipeline.submission import RayJobError, runtime_env

    monkeypatch.delenv("HQSAM_TEST_UNSET", raising=False)
    with pytest.raises(RayJobError, match="HQSAM_TEST_UNSET is not set"):
        runtime_env(["HQSAM_TEST_UNSET"], str(tmp_path))
    for name in ("RAY_ADDRESS", "HQSAM_IN_RAY_JOB", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(cli.app, ["refine", "s3://b/ann.json", "--out", "s3://b/out", "--detach"])
    assert result.exit_code == 2 and "--detach needs --address" in result.output


def test_refine_requests_its_gpus_up_front_on_a_cluster_only(monkeypatch):
    import ray.autoscaler.sdk

    from hqsam.pipeline.refine_pipeline import RefineSettings
    from hqsam.pipeline.refine_run import requested_resources as _requested_resources

    calls = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda **kw: calls.append(kw))
    settings = RefineSettings("vit_l", "sam_hq_vit_l", None, "cuda", min_actors=1, max_actors=4)
    for name in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(name, raising=False)
    with _requested_resources(settings):
        pass
    assert calls == []  # a local, in-process Ray: nothing to ask for

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(KeyError), _requested_resources(settings):
        assert calls == [{"bundles": [{"GPU": 1}] * 4}]
        raise KeyError("the run fails")
    assert calls[-1] == {"bundles": []}  # given back even when the run fails

    calls.clear()
    with _requested_resources(RefineSettings("vit_tiny", "x", None, "cpu", max_actors=2)):
        pass
    assert calls == [{"bundles": [{"CPU": 1}] * 2}, {"bundles": []}]


# Secrets beside or inside the checkout never travel with a job.

PLANTED_SECRET = "PLANTED-SECRET-7f3a"
ROOT_SECRETS = (".env", ".aws/credentials", ".netrc", "id_rsa")
PACKAGE_SECRETS = (
    "pipeline/.env",
    "pipeline/.aws/credentials",
    "jobs/.netrc",
    "hqsam_core/id_rsa",
    "schemas/.secrets/leak.py",  # a .py file under a hidden folder
    "pipeline/.ipynb_checkpoints/stage-checkpoint.py",
    "pipeline/notes.txt",
)


def planted_checkout(root: Path) -> dict[str, Path]:
    """A copy of the project's packages with secrets planted beside and inside them, plus a .py
    symlink pointing at one; returns the package folders as `staged_code` takes them."""
    from hqsam.pipeline.submission import PACKAGES

    for name in PACKAGES:
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for relative in ROOT_SECRETS + PACKAGE_SECRETS:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(f"{PLANTED_SECRET} {relative}\n")
    (root / "jobs" / "credentials_link.py").symlink_to(root / ".aws" / "credentials")
    return {name: root / name for name in PACKAGES}


def our_code_files() -> list[str]:
    from hqsam.pipeline.submission import PACKAGES

    return sorted(
        f"{name}/{path.relative_to(ROOT / name)}"
        for name in PACKAGES
        for path in (ROOT / name).rglob("*.py")
        if "__pycache__" not in path.parts
        and not any(p.startswith(".") for p in path.relative_to(ROOT).parts)
    )


def test_staged_code_leaves_secrets_hidden_folders_and_links_behind(tmp_path):
    from hqsam.pipeline.submission import runtime_env, staged_code

    folders = planted_checkout(tmp_path / "checkout")
    with staged_code(folders) as code:
        staged = Path(code)
        shipped = sorted(str(path.relative_to(staged)) for path in staged.rglob("*") if path.is_file())
        contents = b"".join(path.read_bytes() for path in staged.rglob("*") if path.is_file())
        env = runtime_env([], code)
    assert shipped == our_code_files()  # hqsam/**.py of the four packages, nothing else
    assert PLANTED_SECRET.encode() not in contents
    assert set(env) == {"py_modules", "env_vars"}  # no working_dir: nothing of the checkout is uploaded


SHIPPED_TREE_PROBE = """
import json, os
trees = {}
for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    if "runtime_resources" in entry:
        trees[entry] = sorted(
            os.path.relpath(os.path.join(folder, name), entry)
            for folder, _, names in os.walk(entry) for name in names
        )
secret = any(
    b"PLANTED-SECRET" in open(os.path.join(entry, name), "rb").read()
    for entry, names in trees.items() for name in names
)
print("TREES " + json.dumps({"trees": trees, "secret": secret}))
"""


@pytest.mark.slow
def test_secrets_beside_the_checkout_never_reach_the_job(ray_head, tmp_path):
    """Real Ray packaging and upload, from a checkout holding .env, .aws/credentials, .netrc, id_rsa."""
    from ray.job_submission import JobSubmissionClient

    from hqsam.pipeline.submission import TERMINAL, runtime_env, staged_code

    checkout = tmp_path / "checkout"
    folders = planted_checkout(checkout)
    jobs = JobSubmissionClient(ray_head)
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(SHIPPED_TREE_PROBE)}"
    cwd = os.getcwd()
    os.chdir(checkout)  # submitting from inside the checkout, as a user would
    try:
        with staged_code(folders) as code:
            job_id = jobs.submit_job(entrypoint=command, runtime_env=runtime_env([], code))
    finally:
        os.chdir(cwd)
    deadline = time.time() + 180
    while time.time() < deadline and str(jobs.get_job_status(job_id)) not in TERMINAL:
        time.sleep(0.5)
    logs = jobs.get_job_logs(job_id)
    assert str(jobs.get_job_status(job_id)) == "SUCCEEDED", logs
    probe = json.loads(next(line for line in logs.splitlines() if line.startswith("TREES "))[6:])
    assert "working_dir" not in (jobs.get_job_info(job_id).runtime_env or {})
    (tree,) = probe["trees"].values()  # one shipped tree: the py_modules folder
    assert sorted(path.removeprefix("hqsam/") for path in tree) == our_code_files()
    assert all(path.startswith("hqsam/") and path.endswith(".py") for path in tree)
    assert probe["secret"] is False


def test_submitted_command_is_recorded_and_printed_without_secrets():
    from hqsam.pipeline.submission import shown_command

    argv = [
        "refine",
        "--checkpoint",
        "https://alice:s3cret@h/w.pth?X-Amz-Signature=SIG0&X-Amz-Credential=CRED0",
        "--hq-head",
        "s3://b/head.pth?token=TOKEN0",
        "--",
        "s3://b/ann.json",
    ]
    shown = shown_command(argv)
    assert not any(secret in shown for secret in ("s3cret", "SIG0", "CRED0", "TOKEN0"))
    assert shown.startswith("hqsam refine --checkpoint 'https://***@h/w.pth?X-Amz-Signature=***&")
    assert shown.endswith("-- s3://b/ann.json")


@pytest.mark.slow
def test_job_metadata_and_submitted_line_hold_no_secret(ray_head, tmp_path, capsys):
    from ray.job_submission import JobSubmissionClient

    from hqsam.pipeline.submission import TERMINAL, submit

    secret_url = "https://alice:s3cret@127.0.0.1:9/w.pth?X-Amz-Signature=SIG0&sig=SIGB0&token=TOKEN0"
    argv = [
        "refine",
        "--out",
        str(tmp_path / "out"),
        "--checkpoint",
        secret_url,
        "--",
        str(tmp_path / "a.json"),
    ]
    assert submit(argv, ray_head, detach=True, forward_env=[]) == 0
    printed = capsys.readouterr()
    job_id = printed.out.strip().splitlines()[-1]
    jobs = JobSubmissionClient(ray_head)
    metadata = jobs.get_job_info(job_id).metadata
    deadline = time.time() + 180
    while time.time() < deadline and str(jobs.get_job_status(job_id)) not in TERMINAL:
        time.sleep(0.5)
    for text in (printed.err, json.dumps(metadata)):
        assert not any(secret in text for secret in ("s3cret", "SIG0", "SIGB0", "TOKEN0")), text
    assert "submitted" in printed.err and "https://***@127.0.0.1:9/w.pth" in metadata["hqsam"]
