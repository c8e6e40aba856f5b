"""Arrow schema of what `hqsam refine` reads: `PARQUET_MANIFEST`, the user-facing input alternative to a
COCO file, one row per image (rows that repeat an image_id are one image, as in a COCO file; they
must name the same image_uri).

Ids are whole numbers: a column of floats or text is refused, as is a null image_id or annotation
id. An annotation is identified by its position (annotations counted row after row), so ids may
repeat. A null image_uri makes that image's annotations image_missing.

Either input becomes `IMAGE_TASK` rows (declared with the other refine rows in schemas/refine_rows.py).
"""

import pyarrow as pa

from hqsam.schemas.refine_rows import IMAGE_TASK

__all__ = ["IMAGE_TASK", "MANIFEST_ANNOTATION", "PARQUET_MANIFEST"]

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
        pa.field("image_uri", pa.string()),  # absolute, or relative to --images; null: image_missing
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("annotations", pa.list_(MANIFEST_ANNOTATION)),
    ]
)
