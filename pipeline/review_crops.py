"""The pictures of `hqsam review`: each row's image crop with its original (orange) and refined
(cyan) mask, and what it takes to get them: the image (found as the run read it, or under a root
the images moved to) and the original mask (from the run's input, matched by `ann_index`).

The original masks are not in OUT: they come from the run's input (COCO JSON or Parquet
manifest), matched to the rows by the annotation's position in it (`ann_index`; ids may repeat).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError, one_line
from hqsam.hqsam_core.images import decode_image
from hqsam.hqsam_core.masks import decode_rle, segmentation_to_mask
from hqsam.pipeline.manifest import ManifestError, read_manifest

ORIGINAL_COLOUR = (255, 140, 0)  # orange
REFINED_COLOUR = (0, 255, 255)  # cyan
FILL_ALPHA = 0.35  # the mask's fill over the image; its outline is drawn opaque
OUTLINE_PX = 2  # outline width at the panel's scale, drawn inside each mask's border
PANEL_SIDE = 320  # longest side of a crop as drawn: small objects are enlarged, large ones reduced
MAX_ZOOM = 8  # ...but never enlarged beyond this (a 3-pixel object would be mush)
MARGIN_SHARE = 0.15  # context around the masks, per side, as a share of their box's longer side
MARGIN_MIN_PX = 8
CROP_MIN_PX = 32  # a crop's smallest side in image pixels, context for tiny objects
SUFFIX_DEPTH = 4  # --images without --annotations: how many trailing path parts of image_uri to try
JPEG_QUALITY = 85


class ReviewError(HqsamError, ValueError):
    """OUT or --annotations cannot be used; the message is one sentence (exit code 2)."""


@dataclass
class Original:
    segmentation: str  # COCO segmentation as JSON text, "" when the input had none
    bbox: list[float]  # COCO xywh, [] when absent
    image_uri: str | None  # where the manifest puts the image (honours --images)


# --- the run's input ----------------------------------------------------------------------------


def read_originals(annotations: str, images: str | None, wanted: dict[int, int]) -> dict[int, Original]:
    """ann_index -> Original for `wanted` (ann_index -> image_id), read like `hqsam refine` reads its
    input: the input annotation at the row's position, when it is on the row's image (else OUT was
    refined from another file)."""
    try:
        tasks = read_manifest(annotations, images).tasks
    except ManifestError as error:
        raise ReviewError(str(error)) from None
    image_ids = pa.array(sorted(set(wanted.values())), pa.int64())
    originals = {}
    for task in tasks.filter(pc.is_in(tasks["image_id"], value_set=image_ids)).to_pylist():
        for position, bbox, segmentation in zip(task["ann_indices"], task["bboxes"], task["segmentations"]):
            if wanted.get(position) == task["image_id"]:
                originals[position] = Original(segmentation, bbox or [], task["image_uri"])
    return originals


def original_mask(original: Original | None, height: int, width: int) -> tuple[np.ndarray | None, str | None]:
    """The input annotation's mask, or None and a note on why there is none to draw."""
    if original is None:
        return None, None
    if not original.segmentation:
        return None, "the input annotation has no mask"
    try:
        return segmentation_to_mask(orjson.loads(original.segmentation), height, width), None
    except (ValueError, TypeError, orjson.JSONDecodeError) as error:
        return None, f"original mask unusable: {one_line(error)}"


# --- images -------------------------------------------------------------------------------------


def image_candidates(image_uri: str, images: str | None, original: Original | None) -> list[str]:
    """Where to look for a row's image, in order.

    No --images: the row's image_uri, as the run read it. --images with --annotations: ROOT joined
    with the image's file_name (as `hqsam refine --images ROOT` would). --images alone: ROOT joined
    with the last SUFFIX_DEPTH, ..., 1 path parts of image_uri, longest first.
    """
    if images is None:
        return [image_uri]
    if original is not None and original.image_uri:
        return [original.image_uri]
    path = image_uri.split("://", 1)[-1]
    parts = [part for part in path.split("/") if part]
    depth = min(SUFFIX_DEPTH, len(parts))
    return [storage.join(images, "/".join(parts[-k:])) for k in range(depth, 0, -1)]


def read_image(candidates: list[str], size: tuple[int, int]) -> np.ndarray:
    """The first of `candidates` that exists, decoded (HxWx3 RGB, `size` (h, w) expected); OSError
    or ValueError, in one line, when none can be used."""
    for uri in candidates:
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as error:
            raise OSError(f"cannot read {storage.redact(uri)}: {one_line(error)}") from None
        try:
            return decode_image(data, expected_size=size)
        except ValueError as error:
            raise ValueError(f"{storage.redact(uri)}: {one_line(error)}") from None
    raise FileNotFoundError(f"image not found: {', '.join(storage.redact(c) for c in candidates)}")


def mask_size(row: dict) -> tuple[int, int]:
    """(height, width) of the row's refined mask."""
    segmentation = row.get("segmentation")
    if not segmentation:
        raise ValueError("the row has no refined segmentation")
    height, width = segmentation["size"]
    return int(height), int(width)


# --- crops --------------------------------------------------------------------------------------


def outline(mask: np.ndarray, width: int = OUTLINE_PX) -> np.ndarray:
    """The mask's pixels within `width` of its border: mask XOR its (4-neighbour) erosion.

    Outside the image counts as background, so a mask touching the image edge is outlined there too.
    """
    eroded = mask.astype(bool)
    for _ in range(width):
        padded = np.pad(eroded, 1, constant_values=False)
        eroded = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
    return mask.astype(bool) & ~eroded


def crop_window(masks: list[np.ndarray], height: int, width: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the box around the union of `masks` with a margin, at least CROP_MIN_PX a
    side where the image allows, clipped to the image; the whole image when the masks are empty."""
    union = np.zeros((height, width), bool)
    for mask in masks:
        union |= mask
    rows, cols = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
    if not len(rows):
        return 0, height, 0, width
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    margin = max(MARGIN_MIN_PX, round(MARGIN_SHARE * max(y1 - y0, x1 - x0)))
    y0, y1 = _widened(y0 - margin, y1 + margin, height)
    x0, x1 = _widened(x0 - margin, x1 + margin, width)
    return y0, y1, x0, x1


def _widened(start: int, stop: int, limit: int) -> tuple[int, int]:
    """[start, stop) grown about its centre to CROP_MIN_PX, then shifted and clipped into [0, limit)."""
    grow = max(0, CROP_MIN_PX - (stop - start))
    start, stop = start - grow // 2, stop + grow - grow // 2
    if start < 0:
        start, stop = 0, stop - start
    if stop > limit:
        start, stop = start - (stop - limit), limit
    return max(0, start), min(limit, stop)


def _panel_size(height: int, width: int) -> tuple[int, int]:
    """(width, height) of a crop as drawn."""
    scale = min(MAX_ZOOM, PANEL_SIDE / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _scaled(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to `size` (width, height)."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127


def _overlay(pixels: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], fill: bool) -> None:
    if fill:
        blended = pixels[mask] * (1 - FILL_ALPHA) + np.array(colour) * FILL_ALPHA
        pixels[mask] = blended.round().astype(np.uint8)
    pixels[outline(mask)] = colour


def render_crops(
    image: np.ndarray, refined: np.ndarray, original: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray]:
    """(original panel, refined panel) of one row: the same crop around the union of both masks,
    the original mask filled and outlined in orange on the first, the refined one in cyan on the
    second with the original's outline over it, for comparison. The first is None without an
    original mask. Both are HxWx3 uint8, PANEL_SIDE on their longer side (at most MAX_ZOOM times
    the crop)."""
    height, width = refined.shape
    if image.shape[:2] != (height, width):
        raise ValueError(
            f"image is {image.shape[1]}x{image.shape[0]} but the refined mask is {width}x{height}"
        )
    y0, y1, x0, x1 = crop_window([refined] if original is None else [refined, original], height, width)
    size = _panel_size(y1 - y0, x1 - x0)
    picture = Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1]))
    base = np.array(picture.resize(size, Image.BILINEAR) if picture.size != size else picture)
    refined_here = _scaled(refined[y0:y1, x0:x1], size)
    after = base.copy()
    _overlay(after, refined_here, REFINED_COLOUR, fill=True)
    if original is None:
        return None, after
    original_here = _scaled(original[y0:y1, x0:x1], size)
    before = base.copy()
    _overlay(before, original_here, ORIGINAL_COLOUR, fill=True)
    after[outline(original_here)] = ORIGINAL_COLOUR
    return before, after


def row_crops(
    row: dict, image: np.ndarray, original: Original | None
) -> tuple[list[np.ndarray | None], str | None]:
    """The panels of a row (render_crops) and a note on what could not be drawn (None when all)."""
    height, width = mask_size(row)
    mask, note = original_mask(original, height, width)
    before, after = render_crops(image, decode_rle(row["segmentation"]), mask)
    return [before, after], note


def jpeg(pixels: np.ndarray) -> bytes:
    """JPEG bytes of an RGB array: a tenth of a PNG's size for photographs."""
    buffer = io.BytesIO()
    # no chroma subsampling (4:4:4): it would smear the thin coloured outlines into the image
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()
