"""`hqsam jobs list|status|logs|stop`: operate hqsam's jobs on a Ray cluster (pipeline/submission.py)."""

from __future__ import annotations

import time

import typer

from hqsam.jobs.options import HqsamCommand, HqsamGroup, fail

jobs_app = typer.Typer(
    cls=HqsamGroup,
    help="List, inspect, follow and stop hqsam's jobs on a Ray cluster.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
JOBS_ADDRESS_OPTION = typer.Option(
    None,
    "--address",
    envvar="RAY_ADDRESS",
    help="The cluster: dashboard URL (http://HEAD:8265) or Ray address.",
)
JOB_ID_ARGUMENT = typer.Argument(
    ..., help="Submission id, as `hqsam jobs list` prints it (e.g. raysubmit_4LamXRuQpYdSMg7J)."
)


def _client(address: str | None):
    from hqsam.pipeline.submission import client

    if not address:
        fail("pass --address or set RAY_ADDRESS")
    return client(address)


@jobs_app.command("list", cls=HqsamCommand)
def jobs_list(address: str | None = JOBS_ADDRESS_OPTION) -> None:
    """One line per submitted job, newest last: id, status, start time, command."""
    jobs = _client(address)
    rows = [job for job in jobs.list_jobs() if job.submission_id]
    for job in sorted(rows, key=lambda job: job.start_time or 0):
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000))
            if job.start_time
            else "-"
        )
        command = (job.metadata or {}).get("hqsam") or job.entrypoint
        typer.echo(f"{job.submission_id}  {str(job.status):<9}  {started}  {command}")


@jobs_app.command("status", cls=HqsamCommand)
def jobs_status(job_id: str = JOB_ID_ARGUMENT, address: str | None = JOBS_ADDRESS_OPTION) -> None:
    """Status, timing and the failure reason of one job."""
    from hqsam.pipeline.submission import ask, reason

    jobs = _client(address)
    info = ask(jobs.get_job_info, job_id)
    typer.echo(f"job       {job_id}")
    typer.echo(f"status    {info.status}")
    typer.echo(f"command   {(info.metadata or {}).get('hqsam') or info.entrypoint}")
    if info.start_time:
        end = info.end_time or time.time() * 1000
        typer.echo(f"running   {(end - info.start_time) / 1000:.1f} s")
    if getattr(info, "driver_exit_code", None) is not None:
        typer.echo(f"exit code {info.driver_exit_code}")
    if info.message:
        typer.echo(f"message   {reason(info.message)}")


@jobs_app.command("logs", cls=HqsamCommand)
def jobs_logs(
    job_id: str = JOB_ID_ARGUMENT,
    follow_logs: bool = typer.Option(
        False, "--follow", "-f", help="Keep printing until the job ends; exit with its result."
    ),
    address: str | None = JOBS_ADDRESS_OPTION,
) -> None:
    """The job's driver output (everything the command printed on the cluster)."""
    from hqsam.pipeline.submission import ask, follow, write

    jobs = _client(address)
    if follow_logs:
        raise typer.Exit(follow(jobs, job_id, address))
    write(ask(jobs.get_job_logs, job_id))


@jobs_app.command("stop", cls=HqsamCommand)
def jobs_stop(
    job_id: str = JOB_ID_ARGUMENT,
    wait: float = typer.Option(30.0, "--wait", min=0, help="Seconds to wait for the job to end."),
    address: str | None = JOBS_ADDRESS_OPTION,
) -> None:
    """Stop a running job (its driver gets SIGTERM, then SIGKILL)."""
    from hqsam.pipeline.submission import TERMINAL, stop

    status, stopped = stop(_client(address), job_id, wait)
    typer.echo(f"{job_id} {status}" + ("" if stopped else " (was not running)"))
    if status not in TERMINAL:
        raise typer.Exit(1)
