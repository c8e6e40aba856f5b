"""The rows of `hqsam train` and `hqsam evaluate`, in the order they flow.

1. `SAMPLE_SOURCE` (Arrow): one light row per sample, made on the driver by the source reader
   (`pipeline/train_sources.py`) from a folder pair, a COCO file or a refine output: URIs and
   annotation text, no pixels. A weighted source repeats rows under distinct keys.
2. `LoadedSample`: what `pipeline/load_samples.load_sample` makes of one source row wherever it runs:
   the decoded image and masks plus the row's ids (the evaluator scores these).
3. `TrainSample`: what the `LoadSamples` stage passes to the training workers; it keeps `source` and
   `key`, adds `image` and `mask`, and drops every other source field. A sample that cannot be loaded
   yields no row (and a warning).
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import pyarrow as pa

SAMPLE_SOURCE = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # the source's display name
        pa.field("key", pa.string(), nullable=False),  # unique per sample (and per weighted copy)
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("mask_uri", pa.string()),  # folder pairs: the gt PNG
        pa.field("segmentation", pa.string()),  # COCO segmentation or RLE as JSON text
        pa.field("original_uri", pa.string()),  # folder pairs with ::original=: the original PNG
        pa.field("original_segmentation", pa.string()),  # COCO with ::original=: JSON text
        pa.field("height", pa.int64()),  # the image record's size, when the source has one
        pa.field("width", pa.int64()),
        pa.field("image_id", pa.int64()),  # COCO / refined sources: ids for COCO evaluation
        pa.field("annotation_id", pa.int64()),
        pa.field("category_id", pa.int64()),
    ]
)


class LoadedSample(TypedDict):
    source: str
    key: str
    image: np.ndarray  # (H, W, 3) uint8 RGB, at the recorded size when the source records one
    mask: np.ndarray  # (H, W) bool, never empty
    original: np.ndarray | None  # (H, W) bool: the original annotation, when the source gives one
    image_id: int | None
    annotation_id: int | None
    category_id: int | None


class TrainSample(TypedDict):
    source: str
    key: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) uint8 0/1 (Arrow tensors of bool are not portable)
