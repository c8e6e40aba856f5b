"""The `hqsam` command line: one group, each command defined in the job module named for it."""

from __future__ import annotations

import typer

from hqsam.jobs import evaluate, predict, preview, refine, train
from hqsam.jobs.jobs_commands import jobs_app
from hqsam.jobs.options import HqsamCommand, HqsamGroup

app = typer.Typer(
    cls=HqsamGroup,
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
    pass


for command in (
    predict.predict,
    refine.refine,
    preview.preview,
    train.train,
    train.export,
    evaluate.evaluate,
):
    app.command(cls=HqsamCommand)(command)
app.add_typer(jobs_app, name="jobs")

if __name__ == "__main__":
    app()
