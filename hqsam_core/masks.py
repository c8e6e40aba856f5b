"""COCO mask helpers: RLE encoding/decoding, polygons, boxes and areas on top of pycocotools."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from pycocotools import mask as mask_utils

# Input geometry is checked before pycocotools sees it: its C code trusts its input, and a polygon
# coordinate of about 4.3e8 or more (5x that overflows the int it rasterises in), a NaN, or RLE counts
# that do not cover the image crash the process, or allocate without bound, instead of raising.
# Polygons may stray outside the image (loose annotation tools), but not further than this many
# image sizes, and their outline may not be longer than this many image perimeters (pycocotools
# walks every outline pixel at 5x: 40 bytes each).
MAX_POLYGON_REACH = 8
MAX_POLYGON_OUTLINE = 256
MAX_RUN_CHARACTERS = 7  # a compressed RLE run of a 32-bit count never takes more


def _jsonable(rle: dict) -> dict:
    # pycocotools returns counts as bytes, which JSON cannot hold.
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _compressed(rle: dict) -> dict:
    """An RLE pycocotools can consume: compressed counts (str or bytes) pass through, lists are compressed."""
    if isinstance(rle["counts"], list):
        h, w = rle["size"]
        return mask_utils.frPyObjects(rle, h, w)
    return rle


def encode_rle(mask: np.ndarray) -> dict:
    """Encode a bool/uint8 HxW mask as a compressed COCO RLE with str counts."""
    return _jsonable(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))


def encode_rles(masks: np.ndarray) -> list[dict]:
    """Encode an (N, H, W) stack of masks in one pycocotools call."""
    if masks.ndim != 3:
        raise ValueError(f"expected (N, H, W) masks, got shape {masks.shape}")
    stacked = np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0))
    return [_jsonable(rle) for rle in mask_utils.encode(stacked)]


def decode_rle(rle: dict) -> np.ndarray:
    """Decode a COCO RLE (compressed str/bytes counts or uncompressed list counts) to a bool HxW mask.

    ValueError when the RLE is malformed: a size that is not two non-negative integers, or counts
    that are not non-negative runs covering exactly height * width pixels."""
    check_rle(rle)
    return mask_utils.decode(_compressed(rle)).astype(bool)


def check_rle(rle: dict) -> None:
    """ValueError unless `rle` is a well-formed COCO RLE (what pycocotools assumes without checking)."""
    size = rle["size"]
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in size):
        raise ValueError(f"RLE size {size} is not two non-negative integers")
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        runs = compressed_runs(counts)
    elif isinstance(counts, list):
        runs = np.asarray(counts, dtype=np.float64)
        if runs.ndim != 1 or not np.isfinite(runs).all() or (runs != np.floor(runs)).any():
            raise ValueError("RLE counts are not a list of whole numbers")
    else:
        raise ValueError(f"RLE counts of type {type(counts).__name__} are neither a list nor a string")
    if (runs < 0).any() or runs.sum() != size[0] * size[1]:
        raise ValueError(f"RLE counts do not cover the {size[0]}x{size[1]} mask exactly once")


def compressed_runs(counts: str | bytes) -> np.ndarray:
    """The run lengths a compressed RLE string stands for, read as pycocotools' rleFrString reads it
    (5-bit groups from '0', a set 0x20 bit continues a number, a set 0x10 bit in its last group makes
    it negative, the runs from the fourth on are differences from the run two before), but without
    reading past the end of the string; ValueError where that could not be read."""
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    groups = np.frombuffer(data, np.uint8).astype(np.int64) - ord("0")
    if not groups.size:
        return groups
    if ((groups < 0) | (groups > 63)).any():
        raise ValueError("compressed RLE counts hold characters outside '0'..'o'")
    ends = np.flatnonzero(groups & 0x20 == 0)
    if not ends.size or ends[-1] != groups.size - 1:
        raise ValueError("compressed RLE counts end in the middle of a number")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > MAX_RUN_CHARACTERS:
        raise ValueError("compressed RLE counts hold a number too long for a 32-bit run")
    shifts = 5 * (np.arange(groups.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((groups & 0x1F) << shifts, starts)
    values -= np.where(groups[ends] & 0x10, 1 << (5 * lengths), 0)
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons ([x0, y0, x1, y1, ...] parts) as their union, like COCO's annToMask.

    ValueError for a part that is no flat list of finite numbers, reaches further than
    MAX_POLYGON_REACH image sizes from the image, or has an outline longer than MAX_POLYGON_OUTLINE
    image perimeters."""
    # Parts with fewer than 3 points have no area; a 4-number part would also make
    # frPyObjects read the whole list as bounding boxes.
    parts = [_checked_polygon(p, height, width) for p in polygons if len(p) >= 6]
    if not parts:
        return np.zeros((height, width), dtype=bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(parts, height, width))).astype(bool)


def _checked_polygon(part: Sequence[float], height: int, width: int) -> list[float]:
    """`part` as floats, once it is safe to hand to pycocotools (see MAX_POLYGON_REACH)."""
    values = np.asarray(part, dtype=np.float64)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise ValueError("a polygon holds something other than finite numbers")
    size = max(height, width, 1)
    if np.abs(values).max() > (MAX_POLYGON_REACH + 1) * size:
        raise ValueError(
            f"a polygon reaches more than {MAX_POLYGON_REACH} image sizes outside the {width}x{height} image"
        )
    points = values[: values.size // 2 * 2].reshape(-1, 2)
    outline = np.abs(np.diff(points, axis=0, append=points[:1])).max(axis=1).sum()
    if outline > MAX_POLYGON_OUTLINE * 2 * (height + width + 1):
        raise ValueError(f"a polygon outline is over {MAX_POLYGON_OUTLINE} times the image's perimeter")
    return values.tolist()


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode any COCO segmentation form (polygons, compressed or uncompressed RLE) to a bool mask."""
    if isinstance(segmentation, list) and all(isinstance(p, (list, tuple)) for p in segmentation):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and {"size", "counts"} <= segmentation.keys():
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(f"RLE size {segmentation['size']} does not match image size {[height, width]}")
        return decode_rle(segmentation)
    raise ValueError(f"unsupported COCO segmentation of type {type(segmentation).__name__}")


def segmentation_json_to_mask(text: str, height: int, width: int) -> np.ndarray | None:
    """The (height, width) bool mask of a COCO segmentation given as JSON text; None when there is
    none ("") or it cannot be read."""
    if not text:
        return None
    try:
        return segmentation_to_mask(orjson.loads(text), height, width)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        return None


def mask_to_bbox(mask: np.ndarray) -> list[float]:
    """COCO XYWH box of a mask, as pycocotools toBbox computes it ([0, 0, 0, 0] when empty)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return [float(v) for v in mask_utils.toBbox(rle)]


def rle_bbox(rle: dict) -> list[float]:
    """COCO XYWH box of a COCO RLE, as pycocotools toBbox computes it."""
    return [float(v) for v in mask_utils.toBbox(_compressed(rle))]


def rle_area(rle: dict) -> int:
    """Foreground pixel count of a COCO RLE (compressed or uncompressed)."""
    return int(mask_utils.area(_compressed(rle)))


def bbox_xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    """[x, y, w, h] -> [x0, y0, x1, y1]."""
    x, y, w, h = box
    return [float(x), float(y), float(x + w), float(y + h)]


def bbox_xyxy_to_xywh(box: Sequence[float]) -> list[float]:
    """[x0, y0, x1, y1] -> [x, y, w, h]."""
    x0, y0, x1, y1 = box
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def tight_box_pixel_edges(mask: np.ndarray) -> list[float] | None:
    """XYXY box on pixel edges (x0, y0, x1 + 1, y1 + 1) around the foreground, as COCO boxes are;
    None for an empty mask."""
    if not mask.any():
        return None
    return bbox_xywh_to_xyxy(mask_to_bbox(mask))


def tight_box_inclusive(mask: np.ndarray) -> np.ndarray | None:
    """(4,) float32 XYXY on inclusive pixel indices, as the official `masks_to_boxes` (training and
    evaluation prompts); None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def remove_small_regions(masks: np.ndarray, min_area: int) -> np.ndarray:
    """(N, H, W) bool masks with holes, then islands, smaller than `min_area` pixels removed, as
    SAM's automatic mask generator cleans its masks (segment_anything.utils.amg.remove_small_regions,
    which needs OpenCV). `min_area` 0 returns the masks as they are."""
    if min_area <= 0 or not len(masks):
        return masks
    from segment_anything.utils import amg

    cleaned = np.empty_like(masks)
    for k, mask in enumerate(masks):
        mask, _ = amg.remove_small_regions(mask, min_area, mode="holes")
        cleaned[k], _ = amg.remove_small_regions(mask, min_area, mode="islands")
    return cleaned
