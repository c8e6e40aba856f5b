"""`hqsam review`: a static review site of a refine output, the rows most in need of a person's eye
first, with keys to accept or reject them and an export for `hqsam apply` (the run:
pipeline/review_run.py)."""

from __future__ import annotations

import typer

from hqsam.jobs.options import PROGRESS_OPTION, REFINED_OUT_ARGUMENT, VERBOSE_OPTION

IMAGES_HELP = (
    "Root the images moved to. With --annotations: ROOT/file_name, as `refine --images ROOT`. Without: "
    "ROOT joined with the last 4, 3, 2 or 1 path parts of the run's image_uri, the first that exists. "
    "Default: the image_uri the run read."
)
ANNOTATIONS_HELP = (
    "The run's input (COCO JSON or Parquet manifest), for the original masks (matched by ann_index) and "
    "category names. Default: the input recorded in OUT/_hqsam_run.json, when it still exists; without "
    "one, rows show the refined mask only."
)


def review(
    out: str = REFINED_OUT_ARGUMENT,
    to: str = typer.Option(
        ...,
        "--to",
        metavar="DIR",
        help="Folder for index.html and crops/ (local or s3://); it opens from there, no server.",
    ),
    images: str | None = typer.Option(None, "--images", metavar="ROOT", help=IMAGES_HELP),
    annotations: str | None = typer.Option(None, "--annotations", metavar="IN", help=ANNOTATIONS_HELP),
    n: int = typer.Option(100, "--n", min=1, help="Rows in the review queue."),
    progress: bool = PROGRESS_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Write a review page (index.html, self-contained) of the refined rows that most need a look.

    At the top, per quality column (stability, sam_hq_iou, iou_vs_original, boundary_iou_vs_original,
    score), its distribution over the ok rows per category. Then a queue of N ok rows, those that most need a look
    first: the ones the policy rejected, then ascending by the lowest of stability, sam_hq_iou and
    iou_vs_original (ties by ann_index); each with its image crop, original mask (orange) beside refined (cyan), values and policy verdict.
    Keys: a accept, r reject, s skip, u undo, j/k or arrows to move, e export decisions.json for
    `hqsam apply`. An image that cannot be read is listed with a note instead.
    """
    from hqsam.pipeline.review_run import run_review

    result = run_review(out, to, images=images, annotations=annotations, n=n, progress=progress)
    typer.echo(f"{result.queued} rows to review, {len(result.skipped)} not shown -> {result.index}")
