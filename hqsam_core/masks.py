"""COCO mask helpers: RLE encoding/decoding, polygons, boxes and areas on top of pycocotools."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


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
    """Decode a COCO RLE (compressed str/bytes counts or uncompressed list counts) to a bool HxW mask."""
    return mask_utils.decode(_compressed(rle)).astype(bool)


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons ([x0, y0, x1, y1, ...] parts) as their union, like COCO's annToMask."""
    # Parts with fewer than 3 points have no area; a 4-number part would also make
    # frPyObjects read the whole list as bounding boxes.
    parts = [list(map(float, p)) for p in polygons if len(p) >= 6]
    if not parts:
        return np.zeros((height, width), dtype=bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(parts, height, width))).astype(bool)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode any COCO segmentation form (polygons, compressed or uncompressed RLE) to a bool mask."""
    if isinstance(segmentation, list) and all(isinstance(p, (list, tuple)) for p in segmentation):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and {"size", "counts"} <= segmentation.keys():
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(f"RLE size {segmentation['size']} does not match image size {[height, width]}")
        return decode_rle(segmentation)
    raise ValueError(f"unsupported COCO segmentation of type {type(segmentation).__name__}")


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
