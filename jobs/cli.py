"""The `hqsam` command line: one group, each command defined in the job module named for it."""

from __future__ import annotations

import click
import typer

from hqsam.jobs import apply, evaluate, manifest, predict, refine, review, train
from hqsam.jobs.jobs_commands import jobs_app
from hqsam.jobs.options import HqsamCommand, HqsamGroup

USAGE_ERROR = 2  # HqsamError's exit code: a refusal before any work


class HqsamCli(HqsamGroup):
    """The `hqsam` group; a command that fails after starting Ray points at Ray's logs."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BaseException as error:
            if failed(error):
                point_at_ray_logs()
            raise


def failed(error: BaseException) -> bool:
    """Whether the run itself failed (exit 1, or an exception): a refused command line or input
    (exit 2) is the user's to fix, and Ray's logs would not help."""
    if isinstance(error, (click.exceptions.Exit, typer.Exit)):
        return error.exit_code not in (0, USAGE_ERROR)
    if isinstance(error, SystemExit):
        return error.code not in (0, None, USAGE_ERROR)
    return True


def point_at_ray_logs() -> None:
    from hqsam.pipeline.console import ray_log_dir

    folder = ray_log_dir()
    if folder:
        typer.echo(f"hqsam: Ray's logs of this run are in {folder}", err=True)


app = typer.Typer(
    cls=HqsamCli,
    help="Refine segmentation masks of whole datasets with HQ-SAM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # click's plain help: it wraps at 80 columns where Rich's panels cut words
)


def print_version(requested: bool) -> None:
    """`hqsam --version`: hqsam's version, git revision (from a checkout) and torch/Ray/Python's."""
    if not requested:
        return
    from hqsam.hqsam_core.version import versions

    info = versions()
    git = f" (git {info['git_revision'][:12]}{', modified' if info['git_dirty'] else ''})"
    others = ", ".join(f"{name} {info[name]}" for name in ("torch", "ray", "python") if info[name])
    typer.echo(f"hqsam {info['version']}{git if info['git_revision'] else ''}; {others}")
    raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=print_version,
        help="Print the version, git revision and torch, Ray and Python versions; exit.",
    ),
) -> None:
    # A callback keeps `hqsam` a command group: without it Typer collapses a one-command app
    # into that command, so `hqsam predict IMAGE` would read "predict" as the image.
    from hqsam.pipeline.console import configure

    configure(verbose=False)  # a command's -v (jobs/options.py VERBOSE_OPTION) turns Ray's logs on


for command in (
    predict.predict,
    refine.refine,
    review.review,
    apply.apply,
    train.train,
    train.export,
    evaluate.evaluate,
    manifest.manifest,
):
    app.command(cls=HqsamCommand)(command)
app.add_typer(jobs_app, name="jobs")

if __name__ == "__main__":
    app()
