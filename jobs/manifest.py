"""`hqsam manifest`: a COCO instances file of any size as task-row Parquet parts, in bounded memory
(the run: pipeline/stream_coco.py)."""

from __future__ import annotations

import typer

from hqsam.jobs.options import PROGRESS_OPTION

IMAGES_HELP = "Root that file_name is relative to (default: the annotation file's folder)."
MIB = 2**20


def manifest(
    annotations: str = typer.Argument(..., help="COCO instances JSON (local, s3://, gs://)."),
    out: str = typer.Argument(..., help="Folder for the part-NNNNN.parquet files (local, s3://, gs://)."),
    images: str | None = typer.Option(None, "--images", help=IMAGES_HELP),
    progress: bool = PROGRESS_OPTION,
) -> None:
    """Write the task rows of `hqsam refine` (one per image, or per chunk of an image with many
    annotations) as Parquet parts, reading the file twice as a stream.

    Memory grows with the number of images, not of annotations. The parts, read in name order, hold
    the rows `refine` makes of the same file, in the same order.
    """
    from hqsam.hqsam_core import storage
    from hqsam.pipeline.progress import ProgressReporter
    from hqsam.pipeline.stream_coco import stream_coco

    fs, path = storage.url_to_fs(annotations)
    size = fs.size(path) if fs.exists(path) else 0
    with ProgressReporter("manifest", total=2 * -(-size // MIB), unit="MiB", enabled=progress) as bar:
        counter = _MibCounter(bar)
        result = stream_coco(annotations, out, images_root=images, progress=counter)
    typer.echo(
        f"{result.images} images, {result.annotations} annotations in {result.rows} task rows, "
        f"{len(result.parts)} parts -> {storage.redact(out)}"
    )


class _MibCounter:
    """Bytes read, advanced on the reporter a whole MiB at a time."""

    def __init__(self, bar) -> None:
        self.bar, self.bytes, self.shown = bar, 0, 0

    def __call__(self, count: int) -> None:
        self.bytes += count
        whole = self.bytes // MIB
        if whole > self.shown:
            self.bar.advance(whole - self.shown)
            self.shown = whole
