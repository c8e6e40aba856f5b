"""`hqsam evaluate`: score SAM's mask, the HQ mask and the original annotation per source and overall
(the run: pipeline/evaluate_run.py)."""

from __future__ import annotations

import enum

import typer

from hqsam.jobs.options import (
    ADDRESS_OPTION,
    CHECKPOINT_OPTION,
    CHECKPOINT_SHA256_OPTION,
    DETACH_OPTION,
    DEVICE_OPTION,
    FORWARD_ENV_OPTION,
    HQ_HEAD_OPTION,
    MODEL_OPTION,
    PROGRESS_OPTION,
    VERBOSE_OPTION,
    Device,
    Variant,
    checkpoint_or_default,
    device_or_default,
)


class Resize(str, enum.Enum):
    """How images reach the encoder (hqsam_core.evaluation.RESIZE_MODES)."""

    square = "square"
    longest = "longest"


DATA_HELP = (
    "Data source; repeat for several. An image+gt folder pair SRC (SRC/im/*.jpg|png, SRC/gt/*.png by "
    "stem), a COCO instances JSON, or the OUT of `hqsam refine` (status ok rows); local or s3://, gs://. "
    "Options after '::': images=ROOT (COCO image root), original=URI (the original annotation to score "
    "too: PNG folder or COCO file with the same ids)."
)
RESIZE_HELP = (
    "square: images squashed to 1024x1024 as the official evaluation loader does (comparable with the "
    "paper); longest: longest side to 1024, aspect kept, as `hqsam refine` runs."
)


def evaluate(
    ctx: typer.Context,
    data: list[str] = typer.Option(..., "--data", help=DATA_HELP),
    out: str = typer.Option(..., "--out", help="JSON report file (local or s3://)."),
    model: Variant = MODEL_OPTION,
    checkpoint: str | None = CHECKPOINT_OPTION,
    hq_head: str | None = HQ_HEAD_OPTION,
    checkpoint_sha256: str | None = CHECKPOINT_SHA256_OPTION,
    device: Device | None = DEVICE_OPTION,
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Images per encoder batch."),
    hq_token_only: bool = typer.Option(
        True,
        "--hq-token-only/--no-hq-token-only",
        help="Score the HQ-only output (the paper's HQ-set protocol) or SAM + HQ.",
    ),
    resize: Resize = typer.Option(Resize.square, "--resize", help=RESIZE_HELP),
    min_score: float | None = typer.Option(
        None, "--min-score", help="Refined-Parquet sources: keep rows whose score is at least this."
    ),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Evaluate the first N samples of each source."
    ),
    progress: bool = PROGRESS_OPTION,
    verbose: bool = VERBOSE_OPTION,
    address: str | None = ADDRESS_OPTION,
    detach: bool = DETACH_OPTION,
    forward_env: list[str] = FORWARD_ENV_OPTION,
) -> None:
    """mIoU and mBIoU of SAM's mask, the HQ mask and the original annotation, per source and overall.

    Official protocol: GT tight box prompt, image squashed to 1024x1024 (--resize), HQ mask upsampled
    to the GT size, per-sample means. COCO sources also get mask AP and Boundary AP (COCOeval,
    min(mask IoU, Boundary IoU)). Prints a table (percent) and writes the JSON report (fractions).
    """
    from hqsam.pipeline.submission import submit_if_requested

    submit_if_requested(ctx, address, detach, forward_env)
    from hqsam.pipeline.evaluate_run import EvaluateConfig, format_table, run_evaluate

    config = EvaluateConfig(
        data=data,
        out=out,
        model=model.value,
        checkpoint=checkpoint_or_default(checkpoint, model, checkpoint_sha256),
        hq_head=hq_head,
        device=device_or_default(device),
        batch_size=batch_size,
        hq_token_only=hq_token_only,
        resize=resize.value,
        min_score=min_score,
        limit=limit,
    )
    report = run_evaluate(config, progress=progress)
    typer.echo(format_table(report))
    typer.echo(f"report -> {out}")
