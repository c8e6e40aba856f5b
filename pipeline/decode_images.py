"""Stage 2 (CPU): decode and validate images, and turn each annotation into a box prompt or a status."""

from __future__ import annotations

import math

import numpy as np
import orjson

from hqsam.hqsam_core.images import ImageDecodeError, decode_image
from hqsam.hqsam_core.masks import bbox_xywh_to_xyxy, segmentation_to_mask, tight_box_pixel_edges
from hqsam.schemas.status import Status

NO_PIXELS = np.zeros((0, 0, 3), np.uint8)


class DecodeImages:
    """Decode pixels and build prompts; `box_source` is "bbox" or "segmentation"."""

    def __init__(self, box_source: str = "bbox") -> None:
        if box_source not in ("bbox", "segmentation"):
            raise ValueError(f"box_source must be bbox or segmentation, not {box_source!r}")
        self.box_source = box_source

    def __call__(self, row: dict) -> dict:
        data = row.pop("image_bytes")
        count = len(row["ann_ids"])
        # (N, 4) XYXY prompts, NaN where an annotation is not refined
        row["pixels"], row["prompts"] = NO_PIXELS, np.full((count, 4), np.nan)
        status, error = row.pop("image_status"), row.pop("image_error")
        if status == "ok":
            status, error = self._decode(row, data)
        if status != "ok":
            row["statuses"], row["errors"] = [status] * count, [error] * count
            return row
        row["statuses"], row["errors"] = [], []
        for k in range(count):
            prompt, status, error = self._prompt(row, k)
            if status == Status.PENDING:
                row["prompts"][k] = prompt
            row["statuses"].append(status)
            row["errors"].append(error)
        return row

    def _decode(self, row: dict, data: bytes) -> tuple[str, str]:
        recorded = (row["height"], row["width"])
        known = all(v is not None and v > 0 for v in recorded)
        try:
            pixels = decode_image(data, recorded if known else None)
        except ImageDecodeError as error:
            return "image_unreadable", f"{row['image_uri']}: {error}"
        height, width = pixels.shape[:2]
        if known and (height, width) != recorded:
            decoded, record = f"{width}x{height}", f"{recorded[1]}x{recorded[0]}"
            return "image_size_mismatch", f"{row['image_uri']} decodes to {decoded}, its record says {record}"
        row["pixels"], row["height"], row["width"] = pixels, height, width
        return "ok", ""

    def _prompt(self, row: dict, k: int) -> tuple[list[float], str, str]:
        if row["iscrowd"][k]:
            return [], "crowd_skipped", "iscrowd=1: crowd regions are passed through untouched"
        height, width = row["height"], row["width"]
        if self.box_source == "segmentation":
            try:
                mask = segmentation_to_mask(orjson.loads(row["segmentations"][k] or "null"), height, width)
            except (ValueError, TypeError, orjson.JSONDecodeError) as error:
                return [], "invalid_box", f"no box from the segmentation: {error}"
            box = tight_box_pixel_edges(mask)
            if box is None:
                return [], "invalid_box", "the segmentation is empty, so it gives no box"
        else:
            xywh = list(row["bboxes"][k])
            if len(xywh) != 4:
                return [], "invalid_box", "the annotation has no 4-number bbox"
            box = bbox_xywh_to_xyxy(xywh)
        return _clip_box(box, width, height)


def _clip_box(box: list[float], width: int, height: int) -> tuple[list[float], str, str]:
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in box):
        return [], "invalid_box", f"box {box} is not finite"
    if x1 <= x0 or y1 <= y0:
        return [], "invalid_box", f"box {box} has zero or negative size"
    clipped = [max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return [], "invalid_box", f"box {box} lies entirely outside the {width}x{height} image"
    return clipped, Status.PENDING, ""
