"""The rows of `hqsam refine`, stage by stage: what a row holds after each step of the chain.

A row is one image with its annotations, or, for an image with many annotations, one chunk of at
most a few hundred of them (pipeline/manifest.py bounds the masks a row can carry). Per-annotation
fields are parallel lists (entry k belongs to the row's k-th annotation, in the input file's order);
`ann_indices` gives each annotation's position in the input file, which identifies it (annotation
ids need not be unique) and, through its first entry, the row. Statuses are the values of
`schemas.status.Status`. A field that travels as a numpy array gives its shape in its comment; its
Arrow type describes the same values.

    source             pipeline/manifest.py        -> IMAGE_TASK
    ReadImages         pipeline/read_images.py     -> IMAGE_READ
    DecodeImages       pipeline/decode_images.py   -> IMAGE_DECODED
    RefineMasks        pipeline/refine_masks.py    -> IMAGE_REFINED
    EncodeMasks        pipeline/encode_masks.py    -> IMAGE_ENCODED
    JudgeRows          pipeline/judge_rows.py      -> IMAGE_JUDGED
    WriteParquetParts  pipeline/write_parquet.py   -> IMAGE_WRITTEN, after writing one
                                                      schemas/refined.py row per annotation to OUT

Each stage declares the names it reads, adds and drops; tests/test_refine_stages.py checks those
declarations against this file and against what the stages do.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa


def after(row: pa.Schema, *, drops: Iterable[str] = (), adds: Iterable[pa.Field] = ()) -> pa.Schema:
    """The row a stage makes of `row`: its fields less `drops`, then `adds`."""
    dropped = set(drops)
    missing = dropped - set(row.names)
    if missing:
        raise ValueError(f"cannot drop absent fields {sorted(missing)}")
    return pa.schema([field for field in row if field.name not in dropped] + list(adds))


# The source: one row per image that has annotations (per chunk of an image with many).
IMAGE_TASK = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("image_uri", pa.string()),  # null: no image record for these annotations
        # the record's file_name (a Parquet manifest's image_uri) as written, before --images; null
        # without a record
        pa.field("file_name", pa.string()),
        pa.field("width", pa.int64()),  # as recorded; null when unknown
        pa.field("height", pa.int64()),
        pa.field("ann_ids", pa.list_(pa.int64())),
        # position of each annotation in the input: its index in the COCO file's `annotations` list,
        # or in the Parquet manifest's annotations counted row after row
        pa.field("ann_indices", pa.list_(pa.int64())),
        pa.field("category_ids", pa.list_(pa.int64())),
        pa.field("bboxes", pa.list_(pa.list_(pa.float64()))),  # COCO xywh; [] when not 4 numbers
        pa.field("iscrowd", pa.list_(pa.int64())),
        pa.field("segmentations", pa.list_(pa.string())),  # COCO segmentation as JSON text, "" when absent
    ]
)

IMAGE_READ = after(
    IMAGE_TASK,
    adds=[
        pa.field("image_bytes", pa.binary()),  # the whole file; b"" when it could not be read
        pa.field("image_status", pa.string()),  # Status.OK or Status.IMAGE_MISSING
        pa.field("image_error", pa.string()),  # one line; "" when ok
    ],
)

# Also sets height and width to the decoded size (the record's size whenever the record has one).
IMAGE_DECODED = after(
    IMAGE_READ,
    drops=("image_bytes", "image_status", "image_error"),
    adds=[
        # numpy (height, width, 3) uint8 RGB; (0, 0, 3) when the image did not decode
        pa.field("pixels", pa.list_(pa.list_(pa.list_(pa.uint8(), 3)))),
        # numpy (N, 4) float64 XYXY box prompt per annotation, clipped to the image; NaN unless pending
        pa.field("prompts", pa.list_(pa.list_(pa.float64(), 4))),
        pa.field("statuses", pa.list_(pa.string())),  # Status.PENDING (to refine) or a final status
        pa.field("errors", pa.list_(pa.string())),  # one line each; "" when none
    ],
)

# Turns every pending status into Status.OK, or Status.INFERENCE_FAILED with its error. The prompts
# travel on to the sink, which records each one as its row's `prompt_box`.
IMAGE_REFINED = after(
    IMAGE_DECODED,
    drops=("pixels",),
    adds=[
        # numpy (number of ok annotations, ceil(height * width / 8)) uint8: each ok annotation's
        # refined mask as np.packbits of its height * width pixels, in annotation order
        pa.field("packed_masks", pa.list_(pa.list_(pa.uint8()))),
        pa.field("scores", pa.list_(pa.float64())),  # SAM's predicted IoU; NaN unless ok
        # numpy (N,) float32: the mask's stability score and its IoU with SAM's own mask (the
        # refiner's `Refinement`); NaN unless ok
        pa.field("stabilities", pa.list_(pa.float32())),
        pa.field("sam_hq_ious", pa.list_(pa.float32())),
        # the prompt each annotation got (hqsam_core/guided.py's kinds); "" where none was made
        pa.field("prompt_kinds", pa.list_(pa.string())),
    ],
)

IMAGE_ENCODED = after(
    IMAGE_REFINED,
    drops=("packed_masks",),
    adds=[
        pa.field("rle_counts", pa.list_(pa.string())),  # refined mask's COCO RLE counts; "" unless ok
        # numpy (N, 4) float64: the refined mask's COCO xywh box; NaN unless ok
        pa.field("refined_bboxes", pa.list_(pa.list_(pa.float64(), 4))),
        pa.field("areas", pa.list_(pa.int64())),  # numpy (N,): refined mask's pixel count; -1 unless ok
        # numpy (N,) float32: IoU and boundary IoU of the refined mask with the input's own mask;
        # NaN unless ok with a readable input mask
        pa.field("ious", pa.list_(pa.float32())),
        pa.field("boundary_ious", pa.list_(pa.float32())),
    ],
)

# The acceptance policy's verdict on each ok annotation (hqsam_core/acceptance.py).
IMAGE_JUDGED = after(
    IMAGE_ENCODED,
    adds=[
        pa.field("accepted", pa.list_(pa.int8())),  # numpy (N,) int8: 1 accepted, 0 rejected, -1 unless ok
        pa.field("rejected_by", pa.list_(pa.string())),  # the failing clause; "" unless rejected
    ],
)

# What the sink returns per image, once its rows are in OUT: enough to count progress.
IMAGE_WRITTEN = pa.schema([IMAGE_JUDGED.field("image_id"), IMAGE_JUDGED.field("statuses")])
