"""`hqsam manifest`: a COCO instances file of any size as a task folder, in bounded memory (the
run: pipeline/stream_coco.py)."""

from __future__ import annotations

import typer

from hqsam.jobs.options import PROGRESS_OPTION

IMAGES_HELP = "Root that file_name is relative to (default: the annotation file's folder)."
LIMIT_HELP = "Keep only the first N images that have annotations (all rows of each)."


def manifest(
    annotations: str = typer.Argument(
        ...,
        help="COCO instances JSON, or a Parquet manifest (a file or a folder of parts); local, s3://, gs://.",
    ),
    out: str = typer.Argument(..., help="The task folder to write: new or empty (local, s3://, gs://)."),
    images: str | None = typer.Option(None, "--images", help=IMAGES_HELP),
    limit: int | None = typer.Option(None, "--limit", min=1, help=LIMIT_HELP),
    progress: bool = PROGRESS_OPTION,
) -> None:
    """Turn an annotation file into a task folder that `hqsam refine OUT` reads.

    A task folder holds the task rows of `hqsam refine` (one per image, or per chunk of an image
    with many annotations) as part-NNNNN.parquet files, every image's rows in one part, and
    _hqsam_manifest.json with their counts, written last: a folder without it is incomplete.
    The file is read as a stream, so memory grows with the number of images, not of annotations;
    the parts, read in name order, hold the rows `hqsam refine` makes of the same file, in the
    same order. Make one once and refine it many times (or on a cluster, from s3://).
    """
    from hqsam.hqsam_core import storage
    from hqsam.pipeline.task_source import stream_with_progress

    result = stream_with_progress(annotations, out, images, limit, progress, label="manifest")
    duplicates = result.duplicate_annotation_ids.get("ids", 0)
    typer.echo(
        f"{result.images} images, {result.annotations} annotations in {result.rows} task rows, "
        f"{len(result.parts)} parts"
        + (f" ({duplicates} annotation ids repeated)" if duplicates else "")
        + f" -> {storage.redact(out)}"
    )
