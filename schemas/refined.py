"""Arrow schema of the refined output: one row per input annotation."""

import pyarrow as pa

RLE = pa.struct([pa.field("size", pa.list_(pa.int32())), pa.field("counts", pa.string())])

REFINED_ANNOTATION = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("image_uri", pa.string()),
        pa.field("annotation_id", pa.int64(), nullable=False),  # as in the input; not always unique
        # the annotation's position in the input (schemas/refine_rows.py `ann_indices`): its identity
        pa.field("ann_index", pa.int64(), nullable=False),
        pa.field("category_id", pa.int64()),
        pa.field("bbox", pa.list_(pa.float64())),  # refined mask's box, COCO xywh; null unless ok
        pa.field("area", pa.int64()),  # refined mask's pixel count; null unless ok
        pa.field("segmentation", RLE),  # refined mask as COCO RLE; null unless ok
        pa.field("score", pa.float32()),  # HQ-SAM's predicted IoU
        pa.field("iou_vs_original", pa.float32()),  # null when the input had no mask
        pa.field("boundary_iou_vs_original", pa.float32()),
        pa.field("status", pa.string(), nullable=False),  # one of schemas.status.FINAL_STATUSES
        pa.field("error", pa.string()),  # one line, null when ok
        pa.field("model", pa.string(), nullable=False),
    ]
)
