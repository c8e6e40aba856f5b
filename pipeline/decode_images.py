"""Stage (CPU): decode and validate images, and turn each annotation into a box prompt or a status."""

from __future__ import annotations

import math

import numpy as np
import orjson

from hqsam.hqsam_core.images import ImageDecodeError, ImageSizeMismatchError, decode_at_recorded_size
from hqsam.hqsam_core.masks import bbox_xywh_to_xyxy, segmentation_to_mask, tight_box_pixel_edges
from hqsam.pipeline.stage import Row, Stage
from hqsam.schemas.status import Status

NO_PIXELS = np.zeros((0, 0, 3), np.uint8)
BOX_SOURCES = ("bbox", "segmentation")

Prompt = tuple[list[float], Status, str]  # XYXY box ([] unless pending), status, error


class DecodeImages(Stage):
    """Decodes pixels at the recorded size and builds one prompt per annotation, or its status.

    `box_source`: "bbox" prompts with the COCO bbox, "segmentation" with the tight box of the
    annotation's own mask.
    """

    drops = ("image_bytes", "image_status", "image_error")
    reads = ("image_uri", "height", "width", "bboxes", "iscrowd", "segmentations", *drops)
    adds = ("pixels", "prompts", "statuses", "errors")

    def __init__(self, box_source: str = "bbox") -> None:
        if box_source not in BOX_SOURCES:
            raise ValueError(f"box_source must be bbox or segmentation, not {box_source!r}")
        self.box_source = box_source

    def process(self, rows: list[Row]) -> list[Row]:
        return [self._decode_row(row) for row in rows]

    def _decode_row(self, row: Row) -> Row:
        data = row.pop("image_bytes")
        count = len(row["bboxes"])
        row["pixels"], row["prompts"] = NO_PIXELS, np.full((count, 4), np.nan)
        status, error = row.pop("image_status"), row.pop("image_error")
        if status == Status.OK:
            status, error = _decode(row, data)
        if status != Status.OK:
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

    def _prompt(self, row: Row, k: int) -> Prompt:
        if row["iscrowd"][k]:
            return [], Status.CROWD_SKIPPED, "iscrowd=1: crowd regions are passed through untouched"
        height, width = row["height"], row["width"]
        if self.box_source == "segmentation":
            try:
                mask = segmentation_to_mask(orjson.loads(row["segmentations"][k] or "null"), height, width)
            except (ValueError, TypeError, orjson.JSONDecodeError) as error:
                return [], Status.INVALID_BOX, f"no box from the segmentation: {error}"
            box = tight_box_pixel_edges(mask)
            if box is None:
                return [], Status.INVALID_BOX, "the segmentation is empty, so it gives no box"
        else:
            xywh = list(row["bboxes"][k])
            if len(xywh) != 4:
                return [], Status.INVALID_BOX, "the annotation has no 4-number bbox"
            box = bbox_xywh_to_xyxy(xywh)
        return _clip_box(box, width, height)


def _decode(row: Row, data: bytes) -> tuple[Status, str]:
    """Decode into row["pixels"] and set the row's size to the decoded one; a status and error."""
    try:
        pixels = decode_at_recorded_size(data, row["height"], row["width"])
    except ImageSizeMismatchError as error:
        return Status.IMAGE_SIZE_MISMATCH, f"{row['image_uri']} {error}"
    except ImageDecodeError as error:
        return Status.IMAGE_UNREADABLE, f"{row['image_uri']}: {error}"
    row["pixels"] = pixels
    row["height"], row["width"] = pixels.shape[:2]
    return Status.OK, ""


def _clip_box(box: list[float], width: int, height: int) -> Prompt:
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in box):
        return [], Status.INVALID_BOX, f"box {box} is not finite"
    if x1 <= x0 or y1 <= y0:
        return [], Status.INVALID_BOX, f"box {box} has zero or negative size"
    clipped = [max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return [], Status.INVALID_BOX, f"box {box} lies entirely outside the {width}x{height} image"
    return clipped, Status.PENDING, ""
