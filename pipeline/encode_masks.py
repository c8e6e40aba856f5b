"""Stage (CPU): refined masks -> COCO RLE, box, area and change against the input mask."""

from __future__ import annotations

import numpy as np

from hqsam.hqsam_core.masks import encode_rles, rle_area, rle_bbox, segmentation_json_to_mask
from hqsam.hqsam_core.metrics import mask_and_boundary_ious
from hqsam.hqsam_core.refiner import unpack_masks
from hqsam.pipeline.stage import Row, Stage
from hqsam.schemas.status import Status

MASKS_PER_GROUP = 16  # full-size masks held at once while encoding a row


class EncodeMasks(Stage):
    """Encodes each image's refined masks a few at a time; compares them with the input masks."""

    reads = ("height", "width", "segmentations", "statuses", "packed_masks")
    adds = ("rle_counts", "refined_bboxes", "areas", "ious", "boundary_ious")
    drops = ("packed_masks",)

    def process(self, rows: list[Row]) -> list[Row]:
        return [_encode(row) for row in rows]


def _encode(row: Row) -> Row:
    packed = row.pop("packed_masks")
    count = len(row["statuses"])
    row["rle_counts"] = [""] * count
    row["refined_bboxes"] = np.full((count, 4), np.nan)
    row["areas"] = np.full(count, -1, np.int64)
    row["ious"] = np.full(count, np.nan, np.float32)
    row["boundary_ious"] = np.full(count, np.nan, np.float32)
    ok = [k for k in range(count) if row["statuses"][k] == Status.OK]
    if not ok:
        return row
    # Only decoded images have a size here: a row without an image record carries NaN
    # (Ray's numpy batches turn a null int into NaN), which must not reach int().
    height, width = int(row["height"]), int(row["width"])
    packed = np.asarray(packed, np.uint8)  # the ok annotations' masks, in order
    # A few masks unpacked at a time: memory stays that of a group, whatever the row's mask count.
    for start in range(0, len(ok), MASKS_PER_GROUP):
        group = ok[start : start + MASKS_PER_GROUP]
        refined = unpack_masks(packed[start : start + len(group)], height, width)
        for k, rle in zip(group, encode_rles(refined)):
            row["rle_counts"][k] = rle["counts"]
            row["refined_bboxes"][k] = rle_bbox(rle)
            row["areas"][k] = rle_area(rle)
        _compare_with_originals(row, group, refined, height, width)
    return row


def _compare_with_originals(row: Row, ok: list[int], refined: np.ndarray, height: int, width: int) -> None:
    """IoU and boundary IoU of each refined mask with the annotation's own mask, where it has one;
    `refined[position]` is annotation `ok[position]`'s mask."""
    positions, originals = [], []
    for position, k in enumerate(ok):
        original = segmentation_json_to_mask(row["segmentations"][k], height, width)
        if original is not None:  # an unreadable input mask leaves the comparison empty, not the refinement
            originals.append(original)
            positions.append(position)
    if positions:
        ours, theirs = refined[positions], np.stack(originals)
        keys = [ok[position] for position in positions]
        row["ious"][keys], row["boundary_ious"][keys] = mask_and_boundary_ious(ours, theirs)
