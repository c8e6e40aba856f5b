"""`hqsam predict`: refine a few boxes on one image (the run: pipeline/predict_boxes.py)."""

from __future__ import annotations

import typer

from hqsam.jobs.options import (
    CHECKPOINT_OPTION,
    CHECKPOINT_SHA256_OPTION,
    DEVICE_OPTION,
    HQ_HEAD_OPTION,
    MODEL_OPTION,
    VERBOSE_OPTION,
    Device,
    Variant,
    checkpoint_or_default,
    device_or_default,
)


def predict(
    image: str = typer.Argument(
        ..., help="Image file or URI, in any format Pillow reads (gray, RGBA and 16-bit are converted)."
    ),
    box: list[str] = typer.Option(
        ..., "--box", help="Box prompt x0,y0,x1,y1 in pixels; repeat for more boxes."
    ),
    model: Variant = MODEL_OPTION,
    checkpoint: str | None = CHECKPOINT_OPTION,
    hq_head: str | None = HQ_HEAD_OPTION,
    checkpoint_sha256: str | None = CHECKPOINT_SHA256_OPTION,
    allow_random_hq_head: bool = typer.Option(
        False,
        "--allow-random-hq-head",
        help="Accept a plain SAM checkpoint and keep the HQ head random (tests only).",
    ),
    out: str = typer.Option(
        "predictions", "--out", help="Folder for the mask PNGs and the overlay (local or s3://, gs://)."
    ),
    device: Device | None = DEVICE_OPTION,
    hq_token_only: bool = typer.Option(
        False, "--hq-token-only/--no-hq-token-only", help="HQ logits alone, not SAM+HQ."
    ),
    multimask: bool = typer.Option(
        False, "--multimask", help="Take SAM's best of three masks as the SAM part."
    ),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Refine boxes on one image: writes IMAGE_maskK.png per box and IMAGE_overlay.png."""
    from hqsam.pipeline.predict_boxes import overlay_uri, parse_box, run_predict

    records = run_predict(
        image,
        [parse_box(text) for text in box],
        out,
        variant=model.value,
        checkpoint=checkpoint_or_default(checkpoint, model, checkpoint_sha256),
        hq_head=hq_head,
        allow_random_hq_head=allow_random_hq_head,
        device=device_or_default(device),
        hq_token_only=hq_token_only,
        multimask_output=multimask,
    )
    for k, record in enumerate(records):
        x0, y0, x1, y1 = record["box"]
        typer.echo(
            f"box {k} [{x0:g},{y0:g},{x1:g},{y1:g}]: score {record['score']:.3f}, "
            f"area {record['area']} px -> {record['mask']}"
        )
    typer.echo(f"overlay -> {overlay_uri(image, out)}")
