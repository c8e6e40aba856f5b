"""`hqsam predict`: refine a few boxes on one image and write mask PNGs plus an overlay."""

from __future__ import annotations

import math
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image, ImageDraw

from hqsam.hqsam_core import BoxRefiner, build_hqsam
from hqsam.hqsam_core.allocator import retain_freed_memory
from hqsam.hqsam_core.errors import HqsamError
from hqsam.hqsam_core.images import decode_image

PALETTE = [(255, 64, 64), (64, 200, 255), (255, 200, 0), (120, 255, 120), (220, 100, 255), (255, 140, 40)]


class InputError(HqsamError, ValueError):
    """A bad image or box given on the command line (exit code 2)."""


def parse_box(text: str) -> list[float]:
    """'x0,y0,x1,y1' -> four finite floats with x1 > x0 and y1 > y0."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise InputError(f"box {text!r} is not four comma-separated numbers x0,y0,x1,y1") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise InputError(f"box {text!r} is not four finite numbers x0,y0,x1,y1")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"box {text!r} has no area: x1 must exceed x0 and y1 must exceed y0")
    return values


def read_image(uri: str) -> np.ndarray:
    try:
        with fsspec.open(uri, "rb") as handle:
            data = handle.read()
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {uri}: {error}") from None
    try:
        return decode_image(data)
    except ValueError as error:
        raise InputError(f"{uri}: {error}") from None


def run_predict(
    image_uri: str,
    boxes: list[list[float]],
    out_dir: Path,
    *,
    variant: str,
    checkpoint: str | None,
    hq_head: str | None,
    allow_random_hq_head: bool,
    device: str,
    hq_token_only: bool,
    multimask_output: bool,
) -> list[dict]:
    """Refine `boxes` on one image; returns one record per box (mask file, score, area)."""
    image = read_image(image_uri)
    height, width = image.shape[:2]
    for box in boxes:
        if box[2] <= 0 or box[3] <= 0 or box[0] >= width or box[1] >= height:
            raise InputError(f"box {box} lies entirely outside the {width}x{height} image")
    if device == "cpu":
        retain_freed_memory()
    model = build_hqsam(variant, checkpoint, hq_head, allow_random_hq_head=allow_random_hq_head)
    (result,) = BoxRefiner(model, device).refine(
        [image],
        [np.asarray(boxes, np.float32)],
        hq_token_only=hq_token_only,
        multimask_output=multimask_output,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(image_uri).stem
    records = []
    for k, (mask, score, box) in enumerate(zip(result.masks, result.scores, boxes)):
        mask_path = out_dir / f"{stem}_mask{k}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        records.append({"box": box, "score": float(score), "area": int(mask.sum()), "mask": str(mask_path)})
    overlay_path = out_dir / f"{stem}_overlay.png"
    render_overlay(image, result.masks, boxes).save(overlay_path)
    return records


def render_overlay(image: np.ndarray, masks: np.ndarray, boxes: list[list[float]]) -> Image.Image:
    """Masks tinted over the image with their boxes outlined, one colour per box."""
    canvas = image.astype(np.float32)
    for k, mask in enumerate(masks):
        colour = np.array(PALETTE[k % len(PALETTE)], np.float32)
        canvas[mask] = 0.45 * canvas[mask] + 0.55 * colour
    overlay = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(overlay)
    for k, box in enumerate(boxes):
        draw.rectangle(box, outline=PALETTE[k % len(PALETTE)], width=max(2, min(image.shape[:2]) // 200))
    return overlay


# --- the `hqsam predict` command ------------------------------------------------------------------
# (moved from jobs/cli.py; its options use the shared declarations in jobs/options.py)

import typer  # noqa: E402

from hqsam.hqsam_core.variants import VARIANTS  # noqa: E402
from hqsam.jobs.options import CHECKPOINT_OPTION as _CHECKPOINT_OPTION  # noqa: E402,F401
from hqsam.jobs.options import device_or_default as _device_or_default  # noqa: E402,F401
from hqsam.jobs.options import fail  # noqa: E402
from hqsam.jobs.submit import submit_if_requested  # noqa: E402,F401

MODEL_HELP = f"Model variant: {', '.join(VARIANTS)}."
CHECKPOINT_HELP = (
    "Weights: a path, an fsspec URI (s3://, gs://, https://) or a zoo name such as sam_hq_vit_tiny. "
    "Default: the official HQ-SAM file of --model, downloaded once into $HQSAM_CACHE."
)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
    from hqsam.hqsam_core import CheckpointError
    from hqsam.hqsam_core.zoo import CheckpointSourceError
    from hqsam.jobs.predict import InputError, parse_box, run_predict

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
