"""Arrow schema of the refined output, OUT/rows/part-*.parquet: one row per input annotation.

Every column with its type and meaning (README.md's "Output columns" table says the same): a row can
be used without the input at hand. Per-annotation values that only an `ok` row has are null in the
others; `status` and `error` say why.
"""

import pyarrow as pa

# COCO RLE of a mask: size [height, width], counts as COCO's compressed text
RLE = pa.struct([pa.field("size", pa.list_(pa.int32())), pa.field("counts", pa.string())])

REFINED_ANNOTATION = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),  # the annotation's image_id, as in the input
        pa.field("image_uri", pa.string()),  # where the run read the image (resolved); null: no record
        # the image's file_name as the input's image record (or the manifest's image_uri) writes it,
        # not resolved against --images; null when the image has no record
        pa.field("file_name", pa.string()),
        # the image size used: the decoded size (the recorded size when the image was not decoded);
        # null when unknown
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("annotation_id", pa.int64(), nullable=False),  # as in the input; not always unique
        # the annotation's position in the input (schemas/refine_rows.py `ann_indices`): its identity
        pa.field("ann_index", pa.int64(), nullable=False),
        pa.field("category_id", pa.int64()),  # as in the input; null when not a whole number
        pa.field("iscrowd", pa.int64()),  # the input's iscrowd as 0 or 1 (crowd rows are not refined)
        # the box prompt given to HQ-SAM: XYXY pixels, clipped to the image; null when none was made
        pa.field("prompt_box", pa.list_(pa.float64())),
        pa.field("bbox", pa.list_(pa.float64())),  # refined mask's box, COCO xywh; null unless ok
        pa.field("area", pa.int64()),  # refined mask's pixel count; null unless ok
        pa.field("segmentation", RLE),  # refined mask as COCO RLE; null unless ok
        pa.field("score", pa.float32()),  # SAM's predicted IoU of its own mask token (the HQ token has none)
        # IoU of the refined mask with the input's own mask; null unless ok with a readable input mask
        pa.field("iou_vs_original", pa.float32()),
        pa.field("boundary_iou_vs_original", pa.float32()),  # the same as a boundary IoU
        # the prompt HQ-SAM was given: "box", "box+points" or "box+mask"; a guided prompt for an
        # annotation without a readable mask falls back to "box (no original mask)"; null: none made
        pa.field("prompt", pa.string()),
        # stability score of the written mask's logits: IoU of the masks thresholded at +1 and -1
        # (segment_anything.utils.amg.calculate_stability_score); null unless ok
        pa.field("stability", pa.float32()),
        # IoU of SAM's own mask for the same prompt with the written mask; null unless ok
        pa.field("sam_hq_iou", pa.float32()),
        # the acceptance policy's verdict (--accept): take the refined mask; null unless ok
        pa.field("accepted", pa.bool_()),
        pa.field("rejected_by", pa.string()),  # the policy's clause that failed; null unless rejected
        pa.field("status", pa.string(), nullable=False),  # one of schemas.status.FINAL_STATUSES
        pa.field("error", pa.string()),  # one line, null when ok
        pa.field("model", pa.string(), nullable=False),  # the model that refined the row
    ]
)
