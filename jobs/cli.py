"""The `hqsam` command line."""

from __future__ import annotations

from pathlib import Path

import typer

from hqsam_core.build import VARIANTS

app = typer.Typer(
    help="Refine segmentation masks of whole datasets with HQ-SAM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

MODEL_HELP = f"Model variant: {', '.join(VARIANTS)}."
CHECKPOINT_HELP = (
    "Weights: a path, an fsspec URI (s3://, gs://, https://) or a zoo name such as sam_hq_vit_tiny. "
    "Default: the official HQ-SAM file of --model, downloaded once into $HQSAM_CACHE."
)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


@app.command()
def predict(
    image: str = typer.Argument(
        ..., help="Image file or URI (PNG, JPEG, ...; gray, RGBA and 16-bit are converted)."
    ),
    box: list[str] = typer.Option(
        ..., "--box", help="Box prompt x0,y0,x1,y1 in pixels; repeat for more boxes."
    ),
    model: str = typer.Option("vit_tiny", "--model", help=MODEL_HELP),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    hq_head: str | None = typer.Option(
        None, "--hq-head", help="HQ head file to combine with a plain SAM checkpoint."
    ),
    allow_random_hq_head: bool = typer.Option(
        False,
        "--allow-random-hq-head",
        help="Accept a plain SAM checkpoint and keep the HQ head random (tests only).",
    ),
    out: Path = typer.Option(Path("predictions"), "--out", help="Folder for the mask PNGs and the overlay."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)."),
    hq_token_only: bool = typer.Option(
        False, "--hq-token-only/--no-hq-token-only", help="HQ logits alone, not SAM+HQ."
    ),
    multimask: bool = typer.Option(
        False, "--multimask", help="Take SAM's best of three masks as the SAM part."
    ),
) -> None:
    """Refine boxes on one image: writes IMAGE_maskK.png per box and IMAGE_overlay.png."""
    from hqsam_core import CheckpointError
    from hqsam_core.zoo import CheckpointSourceError
    from jobs.predict import InputError, parse_box, run_predict

    if model not in VARIANTS:
        fail(f"unknown --model {model!r}; choose one of {', '.join(VARIANTS)}")
    try:
        boxes = [parse_box(text) for text in box]
        records = run_predict(
            image,
            boxes,
            out,
            variant=model,
            checkpoint=checkpoint or f"sam_hq_{model}",
            hq_head=hq_head,
            allow_random_hq_head=allow_random_hq_head,
            device=device or default_device(),
            hq_token_only=hq_token_only,
            multimask_output=multimask,
        )
    except (InputError, CheckpointError, CheckpointSourceError) as error:
        fail(str(error))
    for k, record in enumerate(records):
        x0, y0, x1, y1 = record["box"]
        typer.echo(
            f"box {k} [{x0:g},{y0:g},{x1:g},{y1:g}]: score {record['score']:.3f}, "
            f"area {record['area']} px -> {record['mask']}"
        )
    typer.echo(f"overlay -> {out / (Path(image).stem + '_overlay.png')}")


if __name__ == "__main__":
    app()
