"""The `hqsam predict` run: refine a few boxes on one image, write a mask PNG per box and an overlay."""

from __future__ import annotations

import io
import math
import posixpath

import numpy as np
from PIL import Image, ImageDraw

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.allocator import retain_freed_memory
from hqsam.hqsam_core.build import build_hqsam
from hqsam.hqsam_core.errors import HqsamError
from hqsam.hqsam_core.images import decode_image
from hqsam.hqsam_core.refiner import BoxRefiner

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
    """The image at `uri` as HxWx3 uint8 RGB; InputError when it cannot be read or decoded."""
    try:
        data = storage.read_bytes(uri)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {uri}: {error}") from None
    try:
        return decode_image(data)
    except ValueError as error:
        raise InputError(f"{uri}: {error}") from None


def overlay_uri(image_uri: str, out: str) -> str:
    """Where `run_predict` writes the overlay of `image_uri`."""
    return storage.join(out, f"{_stem(image_uri)}_overlay.png")


def run_predict(
    image_uri: str,
    boxes: list[list[float]],
    out: str,
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
    records = []
    for k, (mask, score, box) in enumerate(zip(result.masks, result.scores, boxes)):
        mask_uri = storage.join(out, f"{_stem(image_uri)}_mask{k}.png")
        storage.write_bytes(mask_uri, _png(Image.fromarray(mask.astype(np.uint8) * 255)))
        records.append({"box": box, "score": float(score), "area": int(mask.sum()), "mask": mask_uri})
    storage.write_bytes(overlay_uri(image_uri, out), _png(render_overlay(image, result.masks, boxes)))
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


def _stem(uri: str) -> str:
    return posixpath.splitext(posixpath.basename(uri.split("?", 1)[0]))[0]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
