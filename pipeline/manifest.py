"""Source: turn a COCO instances file or a Parquet manifest into per-image task rows.

The annotation file is the manifest: images are never found by listing buckets.
"""

from __future__ import annotations

import gc
import io
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError
from hqsam.schemas.refine_rows import IMAGE_TASK


class ManifestError(HqsamError, ValueError):
    """The annotation file cannot be used; the message is one sentence."""


@dataclass
class Manifest:
    tasks: pa.Table  # schemas.refine_rows.IMAGE_TASK, one row per image with annotations


def read_manifest(uri: str, images_root: str | None = None) -> Manifest:
    """Read COCO JSON or a Parquet manifest; `images_root` defaults to the file's folder."""
    root = storage.parent(uri) if images_root is None else images_root
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise ManifestError(f"annotation file {uri} does not exist") from None
    if data[:4] == b"PAR1":
        tasks = _tasks_from_parquet(pq.read_table(io.BytesIO(data)), root, uri)
    else:
        tasks = _tasks_from_coco(data, root, uri)
    return Manifest(tasks=tasks)


def annotation_count(tasks: pa.Table) -> int:
    """How many annotations the task rows hold."""
    return pc.sum(pc.list_value_length(tasks["ann_ids"])).as_py() or 0


def _tasks_from_coco(data: bytes, root: str, uri: str) -> pa.Table:
    # A COCO-train-sized file parses into tens of millions of Python objects; the cyclic GC would
    # walk them all again and again while they are built (about half of the parse time). JSON
    # data has no cycles, so pause it; annotations are then flattened in one pass and grouped
    # by image with Arrow, not with per-image Python lists.
    with _gc_paused():
        try:
            coco = storage.parse_json(data)
        except ValueError as error:
            raise ManifestError(f"{uri} is neither Parquet nor valid JSON ({error})") from None
        del data
        if not isinstance(coco, dict) or not isinstance(coco.get("annotations"), list):
            raise ManifestError(f"{uri} is not a COCO instances file: it has no 'annotations' list")
        return _group_by_image(coco.pop("images", None) or [], coco.pop("annotations"), root, uri)


@contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _group_by_image(images: list, annotations: list, root: str, uri: str) -> pa.Table:
    """One row per image id with annotations: images in file order, then ids without an image
    record in order of appearance; within a row, annotations in file order."""
    row_of, records = _image_rows(images)
    rows, ids, category_ids, bboxes, iscrowd, segmentations = _flatten(annotations, row_of, records, uri)
    del annotations
    rows = np.asarray(rows, np.int64)
    counts = np.bincount(rows, minlength=len(records))
    order = np.argsort(rows, kind="stable")  # annotations grouped by row, in file order within one
    kept = np.flatnonzero(counts).tolist()  # an image without annotations has nothing to refine
    if not kept:
        return pa.Table.from_pydict(_columns(), schema=IMAGE_TASK)
    ends = np.cumsum(counts[kept])  # end of each kept row's annotations in `order`
    image_ids, uris = (
        list(row_of),
        [None if r is None else storage.join(root, r["file_name"]) for r in records],
    )
    image_columns = [
        pa.array([image_ids[i] for i in kept], pa.int64()),
        pa.array([uris[i] for i in kept], pa.string()),
        pa.array([None if records[i] is None else records[i].get("width") for i in kept], pa.int64()),
        pa.array([None if records[i] is None else records[i].get("height") for i in kept], pa.int64()),
    ]
    annotation_columns = [
        pa.array(ids, pa.int64()),
        pa.array(category_ids, pa.int64()),
        _boxes(bboxes),
        pa.array([int(v or 0) for v in iscrowd], pa.int64()),
        pa.array(segmentations, pa.string()),  # chunked when over 2 GiB of text
    ]
    text = np.cumsum(np.fromiter(map(len, segmentations), np.int64, len(segmentations))[order])
    del segmentations
    return _record_batches(image_columns, annotation_columns, order, ends, text)


def _image_rows(images: list) -> tuple[dict, list]:
    """Image id -> row (in the order rows are listed), and the image record of each row (the last
    one for a repeated id)."""
    row_of: dict = {}
    records: list = []
    for image in images:
        row = row_of.setdefault(image["id"], len(records))
        if row == len(records):
            records.append(image)
        else:
            records[row] = image
    return row_of, records


def _flatten(annotations: list, row_of: dict, records: list, uri: str) -> tuple[list, ...]:
    """Each annotation's row and fields, as parallel lists; an image id without a record gets a row
    (its record None). Frees each parsed annotation as it goes."""
    rows, ids, category_ids, bboxes, iscrowd, segmentations = [], [], [], [], [], []
    dumps = orjson.dumps
    for position, annotation in enumerate(annotations):
        if "id" not in annotation or "image_id" not in annotation:
            raise ManifestError(f"annotation #{position} in {uri} lacks an 'id' or 'image_id'")
        row = row_of.setdefault(annotation["image_id"], len(records))
        if row == len(records):
            records.append(None)
        rows.append(row)
        ids.append(annotation["id"])
        category_ids.append(annotation.get("category_id"))
        bboxes.append(annotation.get("bbox"))
        iscrowd.append(annotation.get("iscrowd"))
        segmentation = annotation.get("segmentation")
        # decode() also copies the text out of orjson's over-allocated (kilobytes) output buffer
        segmentations.append(dumps(segmentation).decode() if segmentation else "")
        annotations[position] = None  # free the parsed annotation (its polygons) as we go
    return rows, ids, category_ids, bboxes, iscrowd, segmentations


def _record_batches(
    image_columns: list, annotation_columns: list, order: np.ndarray, ends: np.ndarray, text: np.ndarray
) -> pa.Table:
    """The task table: kept row i holds annotations order[ends[i-1]:ends[i]]; `text` is the running
    length of the segmentation text in that order.

    Rows go into record batches of under 1 GiB of segmentation text each, so that no list<string>
    column of a batch overflows its 32-bit offsets (one batch for COCO train)."""
    cuts = np.flatnonzero(np.diff(text[ends - 1] // 2**30)) + 1
    batches = []
    for start, stop in zip([0, *cuts.tolist()], [*cuts.tolist(), len(ends)]):
        first = int(ends[start - 1]) if start else 0
        offsets = pa.array(np.concatenate([[0], ends[start:stop] - first]).astype(np.int32))
        take = pa.array(order[first : int(ends[stop - 1])])
        columns = [column.slice(start, stop - start) for column in image_columns]
        for values in annotation_columns:
            values = values.take(take)
            if isinstance(values, pa.ChunkedArray):
                values = values.combine_chunks()
            columns.append(pa.ListArray.from_arrays(offsets, values))
        batches.append(pa.RecordBatch.from_arrays(columns, schema=IMAGE_TASK))
    return pa.Table.from_batches(batches, schema=IMAGE_TASK)


def _boxes(values: list) -> pa.Array:
    """`_box` of every value as a list<double> array; one numpy conversion when all are 4 numbers."""
    try:
        array = np.array(values)
    except (ValueError, TypeError, OverflowError):
        array = None
    if array is not None and array.ndim == 2 and array.shape[1] == 4 and array.dtype.kind in "iuf":
        flat = pa.array(array.astype(np.float64).reshape(-1))
        return pa.ListArray.from_arrays(pa.array(np.arange(0, len(flat) + 1, 4), pa.int32()), flat)
    return pa.array([_box(value) for value in values], pa.list_(pa.float64()))


def _tasks_from_parquet(table: pa.Table, root: str, uri: str) -> pa.Table:
    missing = {"image_id", "image_uri", "annotations"} - set(table.column_names)
    if missing:
        raise ManifestError(f"{uri} is not an hqsam Parquet manifest: columns {sorted(missing)} are missing")
    columns = _columns()
    for row in table.to_pylist():
        uri = storage.join(root, row["image_uri"])
        annotations = row["annotations"] or []
        _add_task(columns, row["image_id"], uri, row.get("width"), row.get("height"), annotations)
    return pa.Table.from_pydict(columns, schema=IMAGE_TASK)


def _columns() -> dict[str, list]:
    return {field.name: [] for field in IMAGE_TASK}


def _add_task(columns, image_id, uri, width, height, annotations: list[dict]) -> None:
    if not annotations:
        return  # an image without annotations has nothing to refine and no row to write
    columns["image_id"].append(image_id)
    columns["image_uri"].append(uri)
    columns["width"].append(width)
    columns["height"].append(height)
    columns["ann_ids"].append([a["id"] for a in annotations])
    columns["category_ids"].append([a.get("category_id") for a in annotations])
    columns["bboxes"].append([_box(a.get("bbox")) for a in annotations])
    columns["iscrowd"].append([int(a.get("iscrowd") or 0) for a in annotations])
    columns["segmentations"].append([a.get("segmentation") or "" for a in annotations])


def _box(value) -> list[float]:
    if not isinstance(value, list | tuple) or len(value) != 4:
        return []
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return []
