"""Run an hqsam command on a Ray cluster through the Jobs API, and the `hqsam jobs` commands.

A command that takes the shared `--address` option (refine, train, evaluate, ...) calls
`submit_if_requested(...)` first thing. With an address it rebuilds its own argv from what the user
gave on the command line, submits `<python> -m jobs.cli <argv>` as a Ray job, follows the job's logs and
exits with the job's result; without one (or inside a Ray job) it returns and the command runs here.

How the job finds hqsam and a Python to run it (the choices, and why):

* Code: when this CLI runs from a source checkout (the folder above `jobs/` holds hqsam's
  pyproject.toml), that folder is the job's runtime_env `working_dir`, minus `.git`, `.venv`, tests,
  weights and outputs (WORKING_DIR_EXCLUDES). Ray uploads it once per content hash, the driver starts in
  it (`python -m` puts it first on sys.path) and Ray puts it on every worker's PYTHONPATH, so the cluster
  runs exactly the client's code, even over an older hqsam installed there. The dependencies (torch,
  segment-anything, ray) come from the cluster's own install: cluster.yaml's setup commands pip-install
  hqsam at this version, which brings them. From a wheel install (no checkout) nothing is uploaded and
  the cluster's installed hqsam runs. `pip` in the runtime_env was not chosen: it builds a virtualenv
  and reinstalls torch on every node for every new environment, minutes per job.
* Interpreter: Ray runs the entrypoint with `/bin/sh` and the raylet's PATH, whose `python` need not be
  the one Ray runs on (a head started from an unactivated virtualenv sees the system python). So the
  entrypoint names its interpreter: $HQSAM_CLUSTER_PYTHON when set (a path on the cluster nodes);
  else, for a head on this machine, this very interpreter (`sys.executable`, which has Ray and hqsam);
  else the first of `python3` and `python` on the cluster's PATH that can import both Ray and hqsam
  (in the rayproject/ray images that is the interpreter Ray runs on), checked before it runs: a
  cluster without one fails at once with a message saying so, instead of an ImportError deep in a job.
* Re-submission: the runtime_env sets HQSAM_IN_RAY_JOB=1. Ray also sets RAY_ADDRESS (to the GCS
  address) and RAY_JOB_CONFIG_JSON_ENV_VAR for every job driver, including KubeRay RayJob entrypoints
  that never went through this module. With either marker the command runs in-process and `ray.init()`
  attaches to the cluster the job is on (RAY_ADDRESS).
* Secrets: nothing from the local environment travels unless named with `--forward-env NAME`; the
  values go into the runtime_env (visible to whoever can read the cluster's job table), only the
  names are printed.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import os
import shlex
import socket
import sys
import time
import urllib.parse
from pathlib import Path

import typer

IN_JOB_ENV = "HQSAM_IN_RAY_JOB"
CLUSTER_PYTHON_ENV = "HQSAM_CLUSTER_PYTHON"
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for every job driver
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# gitignore-style, relative to the project root; .gitignore'd files are skipped by Ray as well.
WORKING_DIR_EXCLUDES = [
    "/.git",
    "/.venv",
    "/venv",
    "/tests",
    "/benchmarks/results",
    "/example-out",
    "/out",
    "/build",
    "/dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.pth",
    "*.pt",
    "*.ckpt",
    "*.safetensors",
]

# The options submission consumes; never forwarded to the job.
SUBMIT_PARAMS = ("address", "detach", "forward_env")


def in_ray_job() -> bool:
    """True inside a Ray job's driver (ours or any other), where commands run in-process."""
    return bool(os.environ.get(IN_JOB_ENV) or os.environ.get(RAY_JOB_ENV))


def submit_if_requested(
    address: str | None, detach: bool = False, forward_env: list[str] | None = None
) -> None:
    """Call first in a command: with an address (and not already in a job) submit it and exit."""
    if in_ray_job() or not address or address == "local":
        if detach and not in_ray_job():
            _fail("--detach needs --address (or RAY_ADDRESS)")
        return
    ctx = current_context()
    argv = command_argv(ctx)
    warn_local_paths(ctx, address)
    raise typer.Exit(submit(argv, address, detach=detach, forward_env=forward_env or []))


def current_context():
    """The running command's click context (recent typer vendors click as typer._click)."""
    for module in ("typer._click.globals", "click.globals"):
        try:
            ctx = importlib.import_module(module).get_current_context(silent=True)
        except ImportError:
            continue
        if ctx is not None:
            return ctx
    raise RuntimeError("submit_if_requested() must be called from inside a command")


def _given(ctx, name: str) -> bool:
    """Whether the user set this parameter (command line, environment, prompt), not a default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def command_argv(ctx) -> list[str]:
    """The running command's argv, rebuilt from what the user set (command line or environment).

    Defaults are left out so that the cluster decides them (e.g. --device is cuda where there is a GPU).
    """
    names = []
    node = ctx
    while node.parent is not None:
        names.append(node.info_name)
        node = node.parent
    argv = list(reversed(names))
    positional = []
    for param in ctx.command.params:
        if param.name in SUBMIT_PARAMS or param.name not in ctx.params or not _given(ctx, param.name):
            continue
        value = ctx.params[param.name]
        if param.param_type_name == "argument":
            values = value if isinstance(value, (list, tuple)) else [value]
            positional.extend(_text(v) for v in values if v is not None)
            continue
        if getattr(param, "is_flag", False) and isinstance(value, bool):
            if value:
                argv.append(param.opts[0])
            elif param.secondary_opts:
                argv.append(param.secondary_opts[0])
            continue
        values = value if getattr(param, "multiple", False) else [value]
        for item in values:
            if item is not None:
                argv += [param.opts[0], _text(item)]
    # Options first, then `--` so that a positional value starting with '-' stays positional.
    return argv + (["--", *positional] if positional else [])


def warn_local_paths(ctx, address: str) -> None:
    """One warning line when a path-like argument is local and the cluster is not on this machine."""
    if is_local_address(address):
        return
    local = []
    for param in ctx.command.params:
        if param.name in SUBMIT_PARAMS or not _given(ctx, param.name):
            continue
        value = ctx.params.get(param.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (str, Path)) and _looks_local_path(str(item)):
                label = param.name.upper() if param.param_type_name == "argument" else param.opts[0]
                local.append(f"{label} {item}")
    if local:
        typer.secho(
            f"warning: local path(s) {', '.join(local)} will be read on the cluster, where they may not "
            "exist: use s3://, gs:// or a path present on every node",
            err=True,
            fg=typer.colors.YELLOW,
        )


def is_local_address(address: str) -> bool:
    """Whether a Ray address/dashboard URL points at this machine."""
    if address in ("auto", "local"):
        return True
    host = urllib.parse.urlsplit(address if "://" in address else f"//{address}").hostname or ""
    if host in ("localhost", "0.0.0.0", "::1") or host.startswith("127."):
        return True
    try:
        own = socket.gethostname()
        return host in (own, socket.getfqdn()) or host in socket.gethostbyname_ex(own)[2]
    except OSError:
        return False


def entrypoint(argv: list[str], address: str) -> str:
    """The shell command Ray runs on the head: a checked interpreter, never a bare PATH lookup.

    $HQSAM_CLUSTER_PYTHON, when set, is used as is. Otherwise the first candidate that imports both
    Ray and hqsam runs the command: for a head on this machine this interpreter first (and the job
    starts in this directory, so relative paths mean what they mean here), then python3 and python
    from the cluster's PATH. A port-forwarded remote head looks local; its candidates still work.
    """
    args = shlex.join(["-m", "hqsam.jobs.cli", *argv])
    explicit = os.environ.get(CLUSTER_PYTHON_ENV)
    if explicit:
        return f"{shlex.quote(explicit)} {args}"
    local = is_local_address(address)
    candidates = ([sys.executable] if local else []) + ["python3", "python"]
    cd = f"cd {shlex.quote(os.getcwd())} 2>/dev/null; " if local else ""
    missing = (
        f"hqsam: none of {', '.join(candidates)} on the cluster imports both ray and hqsam: install hqsam "
        f"on the nodes (cluster.yaml setup_commands) or set {CLUSTER_PYTHON_ENV} to a Python that has it"
    )
    return (
        f"{cd}for py in {shlex.join(candidates)}; do "
        f'if "$py" -c \'import ray, hqsam.jobs.submit\' 2>/dev/null; then exec "$py" {args}; fi; done; '
        f"echo {shlex.quote(missing)} >&2; exit 127"
    )


def runtime_env(forward_env: list[str]) -> dict:
    env_vars = {IN_JOB_ENV: "1"}
    for name in forward_env:
        if name not in os.environ:
            _fail(f"--forward-env {name}: not set in this environment")
        env_vars[name] = os.environ[name]
    env = {"env_vars": env_vars}
    root = project_root()
    if root is not None:
        env["working_dir"] = str(root)
        env["excludes"] = list(WORKING_DIR_EXCLUDES)
    return env


def project_root() -> Path | None:
    """The source checkout this CLI runs from, or None for an installed wheel."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    try:
        return root if 'name = "hqsam"' in pyproject.read_text() else None
    except OSError:
        return None


def describe_runtime_env(env: dict) -> str:
    """A printable summary with every env value redacted."""
    parts = [f"working_dir={env['working_dir']}"] if "working_dir" in env else ["installed hqsam"]
    forwarded = sorted(set(env["env_vars"]) - {IN_JOB_ENV})
    if forwarded:
        parts.append("env " + ", ".join(f"{name}=***" for name in forwarded))
    return "; ".join(parts)


def client(address: str):
    import logging

    from ray.job_submission import JobSubmissionClient

    # Ray's client-side packaging chatter (these loggers set their own INFO level); job logs come apart.
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the argument; here --address wins.
    saved = {name: os.environ.pop(name, None) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")}
    os.environ["RAY_ADDRESS"] = address
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, ValueError, RuntimeError) as error:
        _fail(f"cannot reach the Ray job server at {address}: {error}")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def submit(argv: list[str], address: str, *, detach: bool, forward_env: list[str]) -> int:
    """Submit `hqsam <argv>` to the cluster; follow it unless detach. Returns the exit code."""
    jobs = client(address)
    env = runtime_env(forward_env)
    command = shlex.join(["hqsam", *argv])
    try:
        job_id = jobs.submit_job(
            entrypoint=entrypoint(argv, address), runtime_env=env, metadata={"hqsam": command}
        )
    except (RuntimeError, ValueError, OSError) as error:  # e.g. the working_dir upload was refused
        _fail(f"could not submit to {address}: {error}")
    typer.echo(f"submitted {job_id} to {address}: {command} [{describe_runtime_env(env)}]", err=True)
    if detach:
        typer.echo(job_id)
        typer.echo(f"follow it with: hqsam jobs logs {job_id} --follow --address {address}", err=True)
        return 0
    return follow(jobs, job_id, address)


def follow(jobs, job_id: str, address: str) -> int:
    """Print the job's logs as they come until it ends; the job's exit code (0 when it succeeded)."""
    printed = [0]  # characters written so far, kept if the stream breaks midway
    try:
        asyncio.run(_tail(jobs, job_id, printed))
    except KeyboardInterrupt:
        _detached_hint(job_id, address)
        return 130
    except Exception:  # the log websocket can be refused by proxies: poll the whole log instead
        pass
    try:
        while True:  # after the stream: catch up with the end of the log and the final status
            done = str(jobs.get_job_status(job_id)) in TERMINAL
            logs = jobs.get_job_logs(job_id)
            _write(logs[printed[0] :])
            printed[0] = max(printed[0], len(logs))
            if done:
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        _detached_hint(job_id, address)
        return 130
    return report(jobs, job_id)


async def _tail(jobs, job_id: str, printed: list[int]) -> None:
    async for chunk in jobs.tail_job_logs(job_id):
        _write(chunk)
        printed[0] += len(chunk)


def report(jobs, job_id: str) -> int:
    """Exit code for a finished job; a failure's reason goes to stderr."""
    info = jobs.get_job_info(job_id)
    status = str(info.status)
    if status == "SUCCEEDED":
        typer.echo(f"job {job_id} succeeded", err=True)
        return 0
    typer.secho(
        f"job {job_id} {status.lower()}: {_reason(info.message)}",
        err=True,
        fg=typer.colors.RED,
    )
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


def _reason(message: str | None) -> str:
    """First line of Ray's job message, without the log excerpt it appends (already printed)."""
    lines = (message or "").strip().splitlines()
    return lines[0].split(", last available logs")[0] if lines else "no reason given"


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def _detached_hint(job_id: str, address: str) -> None:
    typer.echo(
        f"\nstopped following; {job_id} keeps running. Stop it with: hqsam jobs stop {job_id} --address {address}",
        err=True,
    )


def _text(value) -> str:
    return str(value.value if isinstance(value, enum.Enum) else value)


def _looks_local_path(text: str) -> bool:
    if "://" in text:
        return False
    return os.path.exists(text) or text.startswith(("/", "./", "../", "~"))


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


# `hqsam jobs ...`: operate the jobs of a cluster.

jobs_app = typer.Typer(
    help="List, inspect, follow and stop hqsam's jobs on a Ray cluster.", no_args_is_help=True
)
JOBS_ADDRESS_OPTION = typer.Option(
    None,
    "--address",
    envvar="RAY_ADDRESS",
    help="The cluster: dashboard URL (http://HEAD:8265) or Ray address.",
)


def _jobs_client(address: str | None):
    if not address:
        _fail("pass --address or set RAY_ADDRESS")
    return client(address)


@jobs_app.command("list")
def jobs_list(address: str | None = JOBS_ADDRESS_OPTION) -> None:
    """One line per submitted job, newest last: id, status, start time, command."""
    jobs = _jobs_client(address)
    rows = [job for job in jobs.list_jobs() if job.submission_id]
    for job in sorted(rows, key=lambda job: job.start_time or 0):
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000))
            if job.start_time
            else "-"
        )
        command = (job.metadata or {}).get("hqsam") or job.entrypoint
        typer.echo(f"{job.submission_id}  {str(job.status):<9}  {started}  {command}")


@jobs_app.command("status")
def jobs_status(
    job_id: str = typer.Argument(..., help="Submission id (raysubmit_...)."),
    address: str | None = JOBS_ADDRESS_OPTION,
) -> None:
    """Status, timing and the failure reason of one job."""
    jobs = _jobs_client(address)
    try:
        info = jobs.get_job_info(job_id)
    except RuntimeError as error:
        _fail(str(error))
    typer.echo(f"job       {job_id}")
    typer.echo(f"status    {info.status}")
    typer.echo(f"command   {(info.metadata or {}).get('hqsam') or info.entrypoint}")
    if info.start_time:
        end = info.end_time or time.time() * 1000
        typer.echo(f"running   {(end - info.start_time) / 1000:.1f} s")
    if getattr(info, "driver_exit_code", None) is not None:
        typer.echo(f"exit code {info.driver_exit_code}")
    if info.message:
        typer.echo(f"message   {_reason(info.message)}")


@jobs_app.command("logs")
def jobs_logs(
    job_id: str = typer.Argument(..., help="Submission id (raysubmit_...)."),
    follow_logs: bool = typer.Option(
        False, "--follow", "-f", help="Keep printing until the job ends; exit with its result."
    ),
    address: str | None = JOBS_ADDRESS_OPTION,
) -> None:
    """The job's driver output (everything the command printed on the cluster)."""
    jobs = _jobs_client(address)
    if follow_logs:
        raise typer.Exit(follow(jobs, job_id, address))
    try:
        _write(jobs.get_job_logs(job_id))
    except RuntimeError as error:
        _fail(str(error))


@jobs_app.command("stop")
def jobs_stop(
    job_id: str = typer.Argument(..., help="Submission id (raysubmit_...)."),
    wait: float = typer.Option(30.0, "--wait", min=0, help="Seconds to wait for the job to end."),
    address: str | None = JOBS_ADDRESS_OPTION,
) -> None:
    """Stop a running job (its driver gets SIGTERM, then SIGKILL)."""
    jobs = _jobs_client(address)
    try:
        stopped = jobs.stop_job(job_id)
    except RuntimeError as error:
        _fail(str(error))
    deadline = time.time() + wait
    status = str(jobs.get_job_status(job_id))
    while status not in TERMINAL and time.time() < deadline:
        time.sleep(0.5)
        status = str(jobs.get_job_status(job_id))
    typer.echo(f"{job_id} {status}" + ("" if stopped else " (was not running)"))
    if status not in TERMINAL:
        raise typer.Exit(1)
