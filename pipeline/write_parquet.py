"""Sink: one Parquet part file per batch of images, one row per annotation, written atomically.

A part holds whole task rows only (an image, or one chunk of an image's annotations), so the
annotation positions in OUT tell a resumed run which rows are done.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hqsam.hqsam_core import storage
from hqsam.pipeline.read_refined import PART_PREFIX, rows_folder
from hqsam.pipeline.sorted_rows import SORT_KEY, sorted_part_options
from hqsam.pipeline.stage import Row, Stage
from hqsam.schemas.refine_rows import IMAGE_JUDGED, IMAGE_WRITTEN
from hqsam.schemas.refined import REFINED_ANNOTATION
from hqsam.schemas.status import Status


class WriteParquetParts(Stage):
    """Writes encoded images as OUT/rows/part-<hash>.parquet files of at most `images_per_file`
    images (each Ray block whole: no waiting for rows of later blocks); passes on per-image statuses.

    `prefix` starts the part names: write_leftovers names the parts of rows it did not refine apart,
    so that a resume finds and refines them again."""

    reads = ("image_id", "image_uri", "file_name", "height", "width", "ann_ids", "ann_indices")
    reads += ("category_ids", "iscrowd", "prompts", "statuses", "errors")
    reads += ("scores", "rle_counts", "refined_bboxes", "areas", "ious", "boundary_ious")
    reads += ("stabilities", "sam_hq_ious", "prompt_kinds", "accepted", "rejected_by")
    # The sink keeps only what progress needs; everything else is in the part file now.
    drops = tuple(name for name in IMAGE_JUDGED.names if name not in IMAGE_WRITTEN.names)
    whole_blocks = True

    def __init__(self, out: str, model: str, images_per_file: int = 512, prefix: str = PART_PREFIX) -> None:
        self.folder = rows_folder(out)
        self.model = model
        self.batch_size = images_per_file
        self.prefix = prefix

    def process(self, rows: list[Row]) -> list[Row]:
        written = []
        for start in range(0, len(rows), self.batch_size):
            written += self._write_part(rows[start : start + self.batch_size])
        return written

    def _write_part(self, rows: list[Row]) -> list[Row]:
        table = pa.Table.from_pylist(list(self._annotation_rows(rows)), schema=REFINED_ANNOTATION)
        # Sorted by input position (a stable sort, cheap: task rows mostly come in order), so that
        # write_coco merges the parts a few rows at a time.
        table = table.sort_by(SORT_KEY)
        # Named after its rows, not at random: Ray reruns a task whose worker died, and the rerun
        # must replace a part it had already written, not add a second copy of its rows. A row is
        # named by its first annotation's position in the input: unique, even when image ids repeat.
        name = part_name([row["ann_indices"][0] for row in rows], self.prefix)
        write_atomically(f"{self.folder}/{name}", table, sorted_by_position=True)
        return [{"image_id": row["image_id"], "statuses": list(row["statuses"])} for row in rows]

    def _annotation_rows(self, rows: list[Row]) -> Iterator[dict]:
        for row in rows:
            for k in range(len(row["ann_ids"])):
                yield self._annotation_row(row, k)

    def _annotation_row(self, row: Row, k: int) -> dict:
        status = row["statuses"][k]
        ok = status == Status.OK
        # Sizes only for ok rows: without an image record they are NaN (null ints in numpy).
        size = [int(row["height"]), int(row["width"])] if ok else None
        prompt = np.asarray(row["prompts"][k], np.float64)
        return {
            "image_id": int(row["image_id"]),
            "image_uri": _text_or_none(row["image_uri"]),
            "file_name": _text_or_none(row["file_name"]) or None,
            "width": _int_or_none(row["width"]),
            "height": _int_or_none(row["height"]),
            "annotation_id": int(row["ann_ids"][k]),
            "ann_index": int(row["ann_indices"][k]),
            "category_id": _int_or_none(row["category_ids"][k]),
            "iscrowd": int(row["iscrowd"][k]),
            "prompt_box": prompt.tolist() if np.isfinite(prompt).all() else None,  # NaN: no prompt made
            "bbox": [float(v) for v in row["refined_bboxes"][k]] if ok else None,
            "area": int(row["areas"][k]) if ok else None,
            "segmentation": {"size": size, "counts": row["rle_counts"][k]} if ok else None,
            "score": _float_or_none(row["scores"][k]),
            "iou_vs_original": _float_or_none(row["ious"][k]),
            "boundary_iou_vs_original": _float_or_none(row["boundary_ious"][k]),
            "prompt": row["prompt_kinds"][k] or None,
            "stability": _float_or_none(row["stabilities"][k]) if ok else None,
            "sam_hq_iou": _float_or_none(row["sam_hq_ious"][k]) if ok else None,
            "accepted": bool(row["accepted"][k]) if ok else None,
            "rejected_by": row["rejected_by"][k] or None,
            "status": str(status),
            "error": row["errors"][k] or None,
            "model": self.model,
        }


def part_name(first_positions: list[int], prefix: str = PART_PREFIX) -> str:
    """The part file name of the task rows whose first annotations are at these input positions."""
    digest = hashlib.sha256(np.asarray(first_positions, np.int64).tobytes()).hexdigest()[:32]
    return f"{prefix}{digest}.parquet"


def write_atomically(uri: str, table: pa.Table, sorted_by_position: bool = False) -> None:
    """Write a zstd Parquet file that readers see whole or not at all; a table sorted by
    `ann_index` says so in the file's footer."""
    buffer = io.BytesIO()
    options = sorted_part_options(table.schema) if sorted_by_position else {}
    pq.write_table(table, buffer, compression="zstd", **options)
    storage.write_bytes(uri, buffer.getvalue())


def _text_or_none(value) -> str | None:
    """Text as given; None for a missing one, which a block Ray Data kept as pandas hands over as NaN."""
    return value if isinstance(value, str) else None


def _int_or_none(value) -> int | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def _float_or_none(value) -> float | None:
    return None if value is None or math.isnan(value) else float(value)
