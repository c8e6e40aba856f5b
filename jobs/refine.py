"""`hqsam refine`: parse the options, run the refinement (pipeline/refine_run.py), print its summary."""

from __future__ import annotations

import enum

import typer

from hqsam.jobs.options import (
    ADDRESS_OPTION,
    CHECKPOINT_OPTION,
    DETACH_OPTION,
    DEVICE_OPTION,
    FORWARD_ENV_OPTION,
    HQ_HEAD_OPTION,
    MODEL_OPTION,
    PROGRESS_OPTION,
    Device,
    Precision,
    Variant,
    checkpoint_or_default,
    device_or_default,
    fail,
)

CROP_ZOOM_HELP = "Refine boxes under this share of the image's long side on a zoomed crop (e.g. 0.25)."
MAX_PROMPTS_HELP = "Boxes per decoder call: bounds decoder memory (default: 64 on CUDA, 16 on CPU)."
MAX_ERROR_RATE_HELP = "Exit 1 when more than this share of annotations failed."


class OutputFormat(str, enum.Enum):
    parquet = "parquet"
    coco = "coco"


class BoxSource(str, enum.Enum):
    bbox = "bbox"
    segmentation = "segmentation"


def parse_actors(text: str) -> tuple[int, int]:
    """'2' -> (2, 2); '1:8' -> (1, 8)."""
    try:
        low, _, high = text.partition(":")
        bounds = int(low), int(high or low)
    except ValueError:
        fail(f"--actors {text!r} is not MIN or MIN:MAX")
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        fail(f"--actors {text!r} needs 1 <= MIN <= MAX (Ray actor pools cannot scale to zero)")
    return bounds


def refine(
    ctx: typer.Context,
    annotations: str = typer.Argument(..., help="COCO instances JSON or Parquet manifest, path or URI."),
    images: str | None = typer.Option(
        None, "--images", help="Root of relative image paths (default: its folder)."
    ),
    out: str = typer.Option(..., "--out", help="Output folder or URI (local, s3://, gs://)."),
    format: OutputFormat = typer.Option("parquet", "--format", help="coco: also write OUT/annotations.json."),
    model: Variant = MODEL_OPTION,
    checkpoint: str | None = CHECKPOINT_OPTION,
    hq_head: str | None = HQ_HEAD_OPTION,
    device: Device | None = DEVICE_OPTION,
    batch_size: int = typer.Option(
        4, "--batch-size", min=1, help="Images per refine call (with their boxes)."
    ),
    actors: str = typer.Option("1", "--actors", help="Refine actors MIN[:MAX]; MAX > MIN: autoscaled."),
    hq_token_only: bool = typer.Option(False, "--hq-token-only/--no-hq-token-only", help="HQ logits alone."),
    box_source: BoxSource = typer.Option(
        "bbox", "--box-source", help="Prompt from the bbox or the mask's tight box."
    ),
    precision: Precision | None = typer.Option(
        None, "--precision", help="Default: bf16 on CUDA, fp32 on CPU."
    ),
    compile: bool = typer.Option(
        False, "--compile", help="torch.compile the decoder; the first batch pays for it."
    ),
    crop_zoom: float | None = typer.Option(None, "--crop-zoom", min=0.0, max=1.0, help=CROP_ZOOM_HELP),
    max_prompts: int | None = typer.Option(None, "--max-prompts", min=1, help=MAX_PROMPTS_HELP),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Torch threads per actor on CPU."),
    images_per_file: int = typer.Option(
        512, "--images-per-file", min=1, hidden=True, help="Images per part file."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue a run: skip images already written to OUT."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete hqsam's files in OUT and start over."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Refine only the first N images."),
    max_error_rate: float = typer.Option(
        0.01, "--max-error-rate", min=0.0, max=1.0, help=MAX_ERROR_RATE_HELP
    ),
    progress: bool = PROGRESS_OPTION,
    address: str | None = ADDRESS_OPTION,
    detach: bool = DETACH_OPTION,
    forward_env: list[str] = FORWARD_ENV_OPTION,
) -> None:
    """Refine every annotation of a dataset with box-prompted HQ-SAM; one output row per input annotation.

    Every annotation ends as exactly one row with a status: ok, image_missing, image_unreadable,
    image_size_mismatch, invalid_box, crowd_skipped or inference_failed. A summary is printed and
    written to OUT/summary.json.
    """
    from hqsam.pipeline.refine_pipeline import RefineSettings
    from hqsam.pipeline.refine_run import RefineConfig, exit_code, run_refine, summary_lines
    from hqsam.pipeline.submission import submit_if_requested

    submit_if_requested(ctx, address, detach, forward_env)
    if resume and overwrite:
        fail("--resume and --overwrite exclude each other")
    min_actors, max_actors = parse_actors(actors)
    settings = RefineSettings(
        variant=model.value,
        checkpoint=checkpoint_or_default(checkpoint, model),
        hq_head=hq_head,
        device=device_or_default(device),
        batch_size=batch_size,
        min_actors=min_actors,
        max_actors=max_actors,
        hq_token_only=hq_token_only,
        box_source=box_source.value,
        max_prompts=max_prompts,
        torch_threads=threads,
        precision=precision and precision.value,
        compile=compile,
        crop_zoom=crop_zoom,
        images_per_file=images_per_file,
    )
    config = RefineConfig(
        annotations=annotations,
        out=out,
        images=images,
        format=format.value,
        settings=settings,
        resume=resume,
        overwrite=overwrite,
        limit=limit,
        max_error_rate=max_error_rate,
    )
    summary = run_refine(config, progress=progress)
    for line in summary_lines(summary):
        typer.echo(line)
    if not summary["complete"]:
        missing = summary["annotations_total"] - summary["annotations_written"]
        typer.secho(f"{missing} annotations have no output row", err=True, fg=typer.colors.RED)
    raise typer.Exit(exit_code(summary))
