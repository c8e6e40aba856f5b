"""`hqsam preview`: PNG panels of original vs refined masks and an index.html sorted by change
(the run: pipeline/render_preview.py)."""

from __future__ import annotations

import typer

from hqsam.jobs.options import VERBOSE_OPTION

IMAGES_HELP = (
    "Root the images moved to. With --annotations: ROOT/file_name, as `refine --images ROOT`. Without: "
    "ROOT joined with the last 4, 3, 2 or 1 path parts of the run's image_uri, the first that exists. "
    "Default: the image_uri the run read."
)
ANNOTATIONS_HELP = (
    "The run's input (COCO JSON or Parquet manifest), for the original masks and boxes; without it the "
    "panels show the refined outline only."
)


def preview(
    out: str = typer.Argument(..., help="The --out of `hqsam refine` (local, s3://, gs://)."),
    to: str = typer.Option(..., "--to", help="Folder for panel_<annotation_id>.png and index.html."),
    images: str | None = typer.Option(None, "--images", help=IMAGES_HELP),
    annotations: str | None = typer.Option(None, "--annotations", help=ANNOTATIONS_HELP),
    n: int = typer.Option(24, "--n", min=1, help="Number of panels."),
    worst: bool = typer.Option(
        False,
        "--worst",
        help="Show the N largest changes (lowest iou_vs_original) instead of a spread over the whole range.",
    ),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Render PNG panels of image, original (orange) and refined (cyan) outline, and an index.html grid.

    Only ok rows are shown, sorted by iou_vs_original ascending (largest change first); rows without
    an original mask come last. An image that cannot be read is skipped with a note in index.html.
    """
    from hqsam.pipeline.render_preview import run_preview

    result = run_preview(out, to, images=images, annotations=annotations, n=n, worst=worst)
    typer.echo(f"{len(result.written)} panels, {len(result.skipped)} skipped -> {result.index}")
