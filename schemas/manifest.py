"""Arrow schemas of what `hqsam refine` reads.

`PARQUET_MANIFEST` is the user-facing input alternative to a COCO file: one row per image.
`IMAGE_TASK` is the per-image row that flows through the pipeline stages.
"""

import pyarrow as pa

MANIFEST_ANNOTATION = pa.struct(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("category_id", pa.int64()),
        pa.field("bbox", pa.list_(pa.float64())),  # COCO xywh, pixels
        pa.field("segmentation", pa.string()),  # optional: COCO segmentation as JSON text
        pa.field("iscrowd", pa.int64()),
    ]
)

PARQUET_MANIFEST = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),  # absolute, or relative to --images
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("annotations", pa.list_(MANIFEST_ANNOTATION)),
    ]
)

IMAGE_TASK = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("image_uri", pa.string()),  # null: no image record for these annotations
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("ann_ids", pa.list_(pa.int64())),
        pa.field("category_ids", pa.list_(pa.int64())),
        pa.field("bboxes", pa.list_(pa.list_(pa.float64()))),
        pa.field("iscrowd", pa.list_(pa.int64())),
        pa.field("segmentations", pa.list_(pa.string())),  # JSON text, "" when absent
    ]
)
