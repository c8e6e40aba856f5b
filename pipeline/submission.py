"""Run an hqsam command on a Ray cluster through the Jobs API: the library behind `--address`.

A command that takes the shared `--address` option (refine, train, evaluate, ...) calls
`submit_if_requested(ctx, ...)` first thing. With an address it rebuilds its own argv from what the
user gave on the command line, submits `<python> -m hqsam.jobs.cli <argv>` as a Ray job, follows the
job's logs and exits with the job's result; without one (or inside a Ray job) it returns and the
command runs here.

How the job gets hqsam's code and a Python to run it (the choices, and why):

* Code: every submission ships the client's own hqsam code as the runtime_env's `py_modules`: a
  temporary folder `hqsam/` holding copies of the `.py` files of the four installed packages
  (hqsam_core, pipeline, jobs, schemas), found from where Python imports them, so an editable
  install and a built wheel ship alike. Ray uploads it once per content hash and puts it first on
  the PYTHONPATH of the driver and of every worker, so the cluster runs exactly the client's code
  and needs no hqsam installed. Nothing else is uploaded (no `working_dir`): only regular `.py`
  files, none under a hidden folder and no symlink, so nothing from a checkout (.env files, .aws/,
  .netrc, keys, data) can leak to the cluster. The dependencies (torch, segment-anything, ray)
  come from the cluster's own install: the nodes pip-install deploy/cluster-requirements.txt
  (cluster.yaml's setup commands; the KubeRay manifest's runtime_env). `pip` in the submitted
  runtime_env was not chosen: it builds a virtualenv and reinstalls torch on every node for every
  new environment, minutes per job. `write_code_archive` packs the same files into a zip for a
  runtime_env that names its py_modules by URI (deploy/kuberay-refine-job.yaml).
* Interpreter: Ray runs the entrypoint with `/bin/sh` and the raylet's PATH, whose `python` need not
  be the one Ray runs on (a head started from an unactivated virtualenv sees the system python). So
  the entrypoint names its interpreter: $HQSAM_CLUSTER_PYTHON when set (a path on the cluster
  nodes); else, for a head on this machine, this very interpreter (`sys.executable`); else the first
  of `python3` and `python` on the cluster's PATH that can import Ray and the shipped hqsam (in the
  rayproject/ray images that is the interpreter Ray runs on), checked before it runs: a cluster
  without one fails at once with a message saying so, instead of an ImportError deep in a job.
* Re-submission: the runtime_env sets HQSAM_IN_RAY_JOB=1, and Ray sets RAY_JOB_CONFIG_JSON_ENV_VAR
  for every job driver, KubeRay RayJob entrypoints included (`cluster.in_ray_job`). There the
  command runs in-process and `ray.init()` attaches to the cluster the job is on (RAY_ADDRESS).
* Secrets: nothing from the local environment travels unless named with `--forward-env NAME`; the
  values go into the runtime_env (visible to whoever can read the cluster's job table), only the
  names are printed. URLs in the command are redacted (storage.redact) in the job's metadata and
  in every line printed here; the entrypoint itself must carry them as given.

This module knows no CLI framework: `ctx` is the running command's click context (typer.Context),
read through its public attributes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import importlib.util
import io
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from hqsam.hqsam_core.errors import HqsamError, one_line
from hqsam.hqsam_core.storage import redact
from hqsam.pipeline.cluster import IN_JOB_ENV, in_ray_job

CLUSTER_PYTHON_ENV = "HQSAM_CLUSTER_PYTHON"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# The installed subpackages of the `hqsam` namespace, shipped to every job.
PACKAGES = ("hqsam_core", "pipeline", "jobs", "schemas")
# The options submission consumes; never forwarded to the job.
SUBMIT_PARAMS = ("address", "detach", "forward_env")


class RayJobError(HqsamError):
    """The Ray job server could not be reached, refused a submission, or does not know a job."""


def submit_if_requested(
    ctx, address: str | None, detach: bool = False, forward_env: list[str] | None = None
) -> None:
    """Call first in a command: with an address (and not already in a job) submit the command and
    end the process with the job's exit code (SystemExit); otherwise return, and the command runs here.

    `ctx` is the running command's click context (a `ctx: typer.Context` parameter)."""
    if in_ray_job() or not address or address == "local":
        if detach and not in_ray_job():
            raise RayJobError("--detach needs --address (or RAY_ADDRESS).")
        return
    argv = command_argv(ctx)
    warn_local_paths(ctx, address)
    raise SystemExit(submit(argv, address, detach=detach, forward_env=forward_env or []))


def _given(ctx, name: str) -> bool:
    """Whether the user set this parameter (command line, environment, prompt), not a default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _given_params(ctx) -> Iterator:
    """The parameters the user set, submission's own left out."""
    for param in ctx.command.params:
        if param.name not in SUBMIT_PARAMS and param.name in ctx.params and _given(ctx, param.name):
            yield param


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
    for param in _given_params(ctx):
        value = ctx.params[param.name]
        if param.param_type_name == "argument":
            values = value if isinstance(value, (list, tuple)) else [value]
            positional.extend(_text(v) for v in values if v is not None)
        elif getattr(param, "is_flag", False) and isinstance(value, bool):
            if value:
                argv.append(param.opts[0])
            elif param.secondary_opts:
                argv.append(param.secondary_opts[0])
        else:
            for item in value if getattr(param, "multiple", False) else [value]:
                if item is not None:
                    argv += [param.opts[0], _text(item)]
    # Options first, then `--` so that a positional value starting with '-' stays positional.
    return argv + (["--", *positional] if positional else [])


def warn_local_paths(ctx, address: str) -> None:
    """One warning line when a path-like argument is local and the cluster is not on this machine."""
    if is_local_address(address):
        return
    local = []
    for param in _given_params(ctx):
        value = ctx.params[param.name]
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (str, Path)) and _looks_local_path(str(item)):
                label = param.name.upper() if param.param_type_name == "argument" else param.opts[0]
                local.append(f"{label} {item}")
    if local:
        print(
            f"warning: local path(s) {', '.join(local)} will be read on the cluster, where they may not "
            "exist: use s3://, gs:// or a path present on every node",
            file=sys.stderr,
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

    $HQSAM_CLUSTER_PYTHON, when set, is used as is. Otherwise the first candidate that imports Ray
    and the shipped hqsam runs the command: for a head on this machine this interpreter first (and
    the job starts in this directory, so relative paths mean what they mean here), then python3 and
    python from the cluster's PATH. A port-forwarded remote head looks local; its candidates still work.
    """
    args = shlex.join(["-m", "hqsam.jobs.cli", *argv])
    explicit = os.environ.get(CLUSTER_PYTHON_ENV)
    if explicit:
        return f"{shlex.quote(explicit)} {args}"
    local = is_local_address(address)
    candidates = ([sys.executable] if local else []) + ["python3", "python"]
    cd = f"cd {shlex.quote(os.getcwd())} 2>/dev/null; " if local else ""
    missing = (
        f"hqsam: none of {', '.join(candidates)} on the cluster imports ray and hqsam's dependencies: "
        "install deploy/cluster-requirements.txt on the nodes (cluster.yaml setup_commands) or set "
        f"{CLUSTER_PYTHON_ENV} to a Python that has them"
    )
    return (
        f"{cd}for py in {shlex.join(candidates)}; do "
        f'if "$py" -c \'import ray, hqsam.jobs.cli\' 2>/dev/null; then exec "$py" {args}; fi; done; '
        f"echo {shlex.quote(missing)} >&2; exit 127"
    )


def package_folders() -> dict[str, Path]:
    """Where Python imports each of hqsam's packages from (a checkout or site-packages), unimported."""
    folders = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(f"hqsam.{name}")
        if spec is None or spec.origin is None:
            raise RayJobError(f"hqsam.{name} is not installed here, so it cannot be shipped to a job.")
        folders[name] = Path(spec.origin).parent
    return folders


def code_files(folder: Path) -> Iterator[Path]:
    """The `.py` files of a package folder that ship with a job: regular files only, none under a
    hidden or cache folder, no symlink and nothing outside the folder (a link could point at
    ~/.aws/credentials)."""
    root = folder.resolve()
    for source in sorted(folder.rglob("*.py")):
        relative = source.relative_to(folder)
        hidden = any(part.startswith(".") or part == "__pycache__" for part in relative.parts)
        regular = source.is_file() and not source.is_symlink()
        if not hidden and regular and source.resolve().is_relative_to(root):
            yield source


@contextlib.contextmanager
def staged_code(folders: dict[str, Path] | None = None) -> Iterator[str]:
    """A temporary folder `hqsam/` holding copies of the packages' shipped `.py` files (code_files):
    the job's py_modules. `folders` (package name -> folder) defaults to where Python imports them."""
    with tempfile.TemporaryDirectory(prefix="hqsam-job-") as temp:
        staged = Path(temp) / "hqsam"
        for name, folder in (folders or package_folders()).items():
            for source in code_files(folder):
                target = staged / name / source.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        yield str(staged)


def write_code_archive(folder: str | os.PathLike[str]) -> Path:
    """Write the shipped code as `folder/hqsam-code-<sha256 prefix>.zip` for a py_modules URI
    (s3://, https://, file://); returns its path. One top folder, `hqsam-code/`, which Ray strips on
    unpacking, holds `hqsam/...`, which goes on the PYTHONPATH. The bytes depend on the code only,
    so the name changes with the code: Ray caches a py_modules URI by its name."""
    buffer = io.BytesIO()
    with staged_code() as code, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for source in sorted(Path(code).rglob("*.py")):
            name = f"hqsam-code/hqsam/{source.relative_to(code).as_posix()}"
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), source.read_bytes())
    data = buffer.getvalue()
    path = Path(folder) / f"hqsam-code-{hashlib.sha256(data).hexdigest()[:12]}.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def runtime_env(forward_env: list[str], code: str) -> dict:
    """The job's runtime_env: the staged `code` folder as py_modules, the in-job marker, and the
    forwarded variables."""
    env_vars = {IN_JOB_ENV: "1"}
    for name in forward_env:
        if name not in os.environ:
            raise RayJobError(f"--forward-env {name}: {name} is not set in this environment.")
        env_vars[name] = os.environ[name]
    return {"py_modules": [code], "env_vars": env_vars}


def describe_runtime_env(env: dict) -> str:
    """A printable summary with every env value redacted."""
    parts = ["py_modules " + ", ".join(Path(module).name for module in env["py_modules"])]
    forwarded = sorted(set(env["env_vars"]) - {IN_JOB_ENV})
    if forwarded:
        parts.append("env " + ", ".join(f"{name}=***" for name in forwarded))
    return "; ".join(parts)


def client(address: str):
    """A JobSubmissionClient for `address`, which wins over RAY_ADDRESS / RAY_API_SERVER_ADDRESS."""
    import logging

    from ray.job_submission import JobSubmissionClient

    # Ray's client-side packaging chatter (these loggers set their own INFO level); job logs come apart.
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)
    saved = {name: os.environ.pop(name, None) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")}
    os.environ["RAY_ADDRESS"] = address
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise RayJobError(
            f"Cannot reach the Ray job server at {redact(address)}: {_first_line(error)}"
        ) from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def submit(argv: list[str], address: str, *, detach: bool, forward_env: list[str]) -> int:
    """Submit `hqsam <argv>` to the cluster; follow it unless detach. Returns the exit code."""
    jobs = client(address)
    command = shown_command(argv)
    shown_address = redact(address)
    with staged_code() as code:
        env = runtime_env(forward_env, code)
        try:
            job_id = jobs.submit_job(
                entrypoint=entrypoint(argv, address), runtime_env=env, metadata={"hqsam": command}
            )
        except (RuntimeError, ValueError, OSError) as error:  # e.g. the code upload was refused
            raise RayJobError(f"Could not submit to {shown_address}: {one_line(error)}") from None
    print(f"submitted {job_id} to {shown_address}: {command} [{describe_runtime_env(env)}]", file=sys.stderr)
    if detach:
        print(job_id)
        print(f"follow it with: hqsam jobs logs {job_id} --follow --address {shown_address}", file=sys.stderr)
        return 0
    return follow(jobs, job_id, shown_address)


def shown_command(argv: list[str]) -> str:
    """`hqsam <argv>` as recorded in the job's metadata and printed: every URL redacted."""
    return shlex.join(["hqsam", *(redact(arg) for arg in argv)])


def ask(call: Callable, *args):
    """`call(*args)` on a JobSubmissionClient; the server's refusal (e.g. an unknown job id) becomes a
    RayJobError."""
    try:
        return call(*args)
    except RuntimeError as error:
        raise RayJobError(_first_line(error)) from None


def stop(jobs, job_id: str, wait_s: float) -> tuple[str, bool]:
    """Stop a job and wait up to `wait_s` for it to end: its status, and whether it was running."""
    stopped = ask(jobs.stop_job, job_id)
    deadline = time.time() + wait_s
    status = str(jobs.get_job_status(job_id))
    while status not in TERMINAL and time.time() < deadline:
        time.sleep(0.5)
        status = str(jobs.get_job_status(job_id))
    return status, stopped


def follow(jobs, job_id: str, address: str) -> int:
    """Print the job's logs as they come until it ends; the job's exit code (0 when it succeeded)."""
    printed = [0]  # characters written so far, kept if the stream breaks midway
    try:
        asyncio.run(_tail(jobs, job_id, printed))
    except KeyboardInterrupt:
        return _detached(job_id, address)
    except Exception:  # the log websocket can be refused by proxies: poll the whole log instead
        pass
    try:
        while True:  # after the stream: catch up with the end of the log and the final status
            done = str(jobs.get_job_status(job_id)) in TERMINAL
            logs = jobs.get_job_logs(job_id)
            write(logs[printed[0] :])
            printed[0] = max(printed[0], len(logs))
            if done:
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        return _detached(job_id, address)
    return report(jobs, job_id)


async def _tail(jobs, job_id: str, printed: list[int]) -> None:
    async for chunk in jobs.tail_job_logs(job_id):
        write(chunk)
        printed[0] += len(chunk)


def report(jobs, job_id: str) -> int:
    """Exit code for a finished job; a failure's reason goes to stderr."""
    info = jobs.get_job_info(job_id)
    status = str(info.status)
    if status == "SUCCEEDED":
        print(f"job {job_id} succeeded", file=sys.stderr)
        return 0
    print(f"job {job_id} {status.lower()}: {reason(info.message)}", file=sys.stderr)
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


def reason(message: str | None) -> str:
    """First line of Ray's job message, without the log excerpt it appends (already printed)."""
    lines = (message or "").strip().splitlines()
    return lines[0].split(", last available logs")[0] if lines else "no reason given"


def write(text: str) -> None:
    """Job output to stdout as it comes."""
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def _detached(job_id: str, address: str) -> int:
    print(
        f"\nstopped following; {job_id} keeps running. Stop it with: hqsam jobs stop {job_id} --address {address}",
        file=sys.stderr,
    )
    return 130


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _text(value) -> str:
    return str(value.value if isinstance(value, enum.Enum) else value)


def _looks_local_path(text: str) -> bool:
    if "://" in text:
        return False
    return os.path.exists(text) or text.startswith(("/", "./", "../", "~"))
