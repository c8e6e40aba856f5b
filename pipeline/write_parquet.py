"""Sink: one Parquet part file per batch of images, one row per annotation, written atomically.

A part holds whole images only, so the set of image ids in OUT tells a resumed run what is done.
"""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hqsam.hqsam_core import storage
from hqsam.pipeline.read_refined import PART_PREFIX
from hqsam.schemas.refined import REFINED_ANNOTATION


class WriteParquetParts:
    """Writes each batch of encoded image rows as OUT/part-<hash>.parquet; returns per-image statuses."""

    def __init__(self, out: str, model: str) -> None:
        self.out = out.rstrip("/")
        self.model = model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        table = pa.Table.from_pylist(list(self._rows(batch)), schema=REFINED_ANNOTATION)
        # Named after its images, not at random: Ray reruns a task whose worker died (max_retries=-1),
        # and the rerun must replace a part it had already written, not add a second copy of its rows.
        name = hashlib.sha256(np.asarray(batch["image_id"], np.int64).tobytes()).hexdigest()[:32]
        write_atomically(f"{self.out}/{PART_PREFIX}{name}.parquet", table)
        statuses = np.empty(len(batch["image_id"]), dtype=object)
        statuses[:] = [list(s) for s in batch["statuses"]]
        return {"image_id": batch["image_id"], "statuses": statuses}

    def _rows(self, batch):
        for i, image_id in enumerate(batch["image_id"]):
            height, width = batch["height"][i], batch["width"][i]
            for k, annotation_id in enumerate(batch["ann_ids"][i]):
                ok = batch["statuses"][i][k] == "ok"
                # Sizes only for ok rows: without an image record they are NaN (null ints in numpy).
                rle = {"size": [int(height), int(width)], "counts": batch["rle_counts"][i][k]} if ok else None
                yield {
                    "image_id": int(image_id),
                    "image_uri": batch["image_uri"][i],
                    "annotation_id": int(annotation_id),
                    "category_id": _int_or_none(batch["category_ids"][i][k]),
                    "bbox": [float(v) for v in batch["refined_bboxes"][i][k]] if ok else None,
                    "area": int(batch["areas"][i][k]) if ok else None,
                    "segmentation": rle,
                    "score": _float_or_none(batch["scores"][i][k]),
                    "iou_vs_original": _float_or_none(batch["ious"][i][k]),
                    "boundary_iou_vs_original": _float_or_none(batch["boundary_ious"][i][k]),
                    "status": batch["statuses"][i][k],
                    "error": batch["errors"][i][k] or None,
                    "model": self.model,
                }


def write_atomically(uri: str, table: pa.Table) -> None:
    """Write a zstd Parquet file that readers see whole or not at all."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes(uri, buffer.getvalue())


def _int_or_none(value) -> int | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def _float_or_none(value) -> float | None:
    return None if value is None or math.isnan(value) else float(value)
