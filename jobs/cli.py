"""The `hqsam` command line: one group, each command defined in the job module named for it."""

from __future__ import annotations

import typer

from hqsam.jobs import evaluate, predict, preview, refine, train
from hqsam.jobs.jobs_commands import jobs_app
from hqsam.jobs.options import HqsamGroup

app = typer.Typer(
    cls=HqsamGroup,
    help="Refine segmentation masks of whole datasets with HQ-SAM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main() -> None:
    # A callback keeps `hqsam` a command group: without it Typer collapses a one-command app
    # into that command, so `hqsam predict IMAGE` would read "predict" as the image.
    pass


app.command()(predict.predict)
app.command()(refine.refine)
app.command()(preview.preview)
app.command()(train.train)
app.command()(train.export)
app.command()(evaluate.evaluate)
app.add_typer(jobs_app, name="jobs")

if __name__ == "__main__":
    app()
