"""Stage 4 (CPU): refined masks -> COCO RLE, box, area and change against the input mask."""

from __future__ import annotations

import numpy as np
import orjson

from hqsam.hqsam_core.masks import encode_rles, rle_area, rle_bbox, segmentation_to_mask
from hqsam.hqsam_core.metrics import boundary_iou_batch, mask_iou_batch


def encode_masks(row: dict) -> dict:
    """Replace `packed_masks` with `rles` (str counts), `refined_bboxes`, `areas`, `ious`, `boundary_ious`."""
    packed = row.pop("packed_masks")
    count = len(packed)
    row["rle_counts"] = [""] * count
    row["refined_bboxes"] = np.full((count, 4), np.nan)
    row["areas"] = np.full(count, -1, np.int64)
    row["ious"] = np.full(count, np.nan, np.float32)
    row["boundary_ious"] = np.full(count, np.nan, np.float32)
    ok = [k for k in range(count) if row["statuses"][k] == "ok"]
    if not ok:
        return row
    # Only decoded images have a size here: a row without an image record carries NaN
    # (Ray's numpy batches turn a null int into NaN), which must not reach int().
    height, width = int(row["height"]), int(row["width"])
    refined = np.stack([_unpack(packed[k], height, width) for k in ok])
    for k, rle in zip(ok, encode_rles(refined)):
        row["rle_counts"][k] = rle["counts"]
        row["refined_bboxes"][k] = rle_bbox(rle)
        row["areas"][k] = rle_area(rle)
    with_original = [(position, k) for position, k in enumerate(ok) if row["segmentations"][k]]
    originals, compared = [], []
    for position, k in with_original:
        try:
            originals.append(segmentation_to_mask(orjson.loads(row["segmentations"][k]), height, width))
            compared.append((position, k))
        except (ValueError, TypeError, orjson.JSONDecodeError):
            pass  # an unreadable input mask leaves the comparison empty, not the refinement
    if compared:
        ours = refined[[position for position, _ in compared]]
        theirs = np.stack(originals)
        keys = [k for _, k in compared]
        row["ious"][keys] = mask_iou_batch(ours, theirs)
        row["boundary_ious"][keys] = boundary_iou_batch(ours, theirs)
    return row


def _unpack(packed: bytes, height: int, width: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(packed, np.uint8), count=height * width)
    return bits.reshape(height, width).astype(bool)
