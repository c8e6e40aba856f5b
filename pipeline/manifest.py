"""Source: turn a COCO instances file or a Parquet manifest into task rows (schemas/refine_rows.py).

The annotation file is the manifest: images are never found by listing buckets. An annotation is
identified by its position in the file, not by its id (merged datasets repeat ids). A file whose
structure cannot be trusted (ids that are not integers, records that are not objects, a broken
Parquet file) is refused in one sentence before any work; a flaw that spoils only some annotations
(an image record without a file name) becomes their status downstream (image_missing).
"""

from __future__ import annotations

import contextlib
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
from hqsam.hqsam_core.errors import HqsamError, one_line
from hqsam.schemas.refine_rows import IMAGE_TASK

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
ID_RULE = "ids must be whole numbers within 64 bits (1, not 1.0, '1' or true)"
# Every row carries its annotations' masks through the chain (bit-packed: pixels / 8 bytes each),
# so an image with many boxes is split into rows of at most this many annotations...
MAX_ANNOTATIONS_PER_ROW = 256
# ...and fewer on large images, so that one row's packed masks stay under 32 MiB (unpacked 256 MiB).
ROW_MASK_PIXELS = 2**28
ANNOTATIONS_PER_ROW_OF_UNKNOWN_SIZE = 64
BOX_TYPE = pa.list_(pa.float64())


class ManifestError(HqsamError, ValueError):
    """The annotation file cannot be used; the message is one sentence."""


@dataclass
class Manifest:
    tasks: pa.Table  # schemas.refine_rows.IMAGE_TASK rows


def read_manifest(uri: str, images_root: str | None = None) -> Manifest:
    """Read COCO JSON or a Parquet manifest; `images_root` defaults to the file's folder."""
    root = storage.parent(uri) if images_root is None else images_root
    name = storage.redact(uri)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise ManifestError(f"annotation file {name} does not exist") from None
    if data[:4] == b"PAR1":
        return Manifest(tasks=_tasks_from_parquet(data, root, name))
    return Manifest(tasks=_tasks_from_coco(data, root, name))


def annotation_count(tasks: pa.Table) -> int:
    """How many annotations the task rows hold."""
    return pc.sum(pc.list_value_length(tasks["ann_ids"])).as_py() or 0


def image_count(tasks: pa.Table) -> int:
    """How many images the task rows hold (an image split into several rows counts once)."""
    return pc.count_distinct(tasks["image_id"]).as_py()


def first_images(tasks: pa.Table, count: int) -> pa.Table:
    """The rows of the first `count` images, every row of each (an image's rows are adjacent)."""
    ids = tasks["image_id"].to_numpy()
    starts = np.ones(len(ids), bool)
    starts[1:] = ids[1:] != ids[:-1]
    return tasks.slice(0, int(np.searchsorted(np.cumsum(starts), count, side="right")))


def duplicate_annotation_ids(tasks: pa.Table, examples: int = 5) -> dict:
    """Annotation ids that more than one annotation carries: how many, on how many annotations,
    and the smallest `examples` of them, ascending (rows are matched to annotations by position,
    so these are only reported)."""
    counts = pc.value_counts(pc.list_flatten(tasks["ann_ids"]))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    return {
        "ids": len(repeated),
        "annotations": pc.sum(repeated.field("counts")).as_py() or 0,
        "examples": np.sort(repeated.field("values").to_numpy())[:examples].tolist(),
    }


def annotations_per_row(width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """The most annotations one task row of an image of this recorded size (<= 0: unknown) holds."""
    width, height = np.clip(width, 0, 2**31), np.clip(height, 0, 2**31)
    pixels = width * height
    fitting = np.clip(ROW_MASK_PIXELS // np.maximum(pixels, 1), 1, MAX_ANNOTATIONS_PER_ROW)
    return np.where(pixels > 0, fitting, ANNOTATIONS_PER_ROW_OF_UNKNOWN_SIZE)


class _Images:
    """The image records, one row per image id (in the order ids are first seen); annotations of an
    id without a record get a row without a URI."""

    def __init__(self, root: str, name: str) -> None:
        self.root, self.name = root, name
        self.row_of: dict[int, int] = {}
        self.uris: list[str | None] = []
        self.file_names: list[str | None] = []  # as the record writes them, before the root
        self.widths: list[int | None] = []
        self.heights: list[int | None] = []

    def add(self, image_id: int, file_name, width, height) -> int:
        """The row of a record; a repeated id must name the same file (the last record's size wins)."""
        file_name = file_name if isinstance(file_name, str) and file_name else None
        uri = storage.join(self.root, file_name) if file_name else None
        row = self.row_of.get(image_id)
        if row is None:
            row = self._new_row(image_id, uri, file_name)
        elif self.uris[row] != uri:
            raise ManifestError(
                f"image id {image_id} has two records in {self.name} naming different files "
                f"({self.uris[row]!r} and {uri!r})"
            )
        self.widths[row], self.heights[row] = recorded_size(width), recorded_size(height)
        return row

    def unrecorded(self, image_id: int, position: int) -> int:
        """A row for an id without an image record, first met at annotation #`position`."""
        if not _is_id(image_id):
            raise ManifestError(f"annotation #{position} in {self.name} has image_id {image_id!r}: {ID_RULE}")
        return self._new_row(image_id, None, None)

    def _new_row(self, image_id: int, uri: str | None, file_name: str | None) -> int:
        row = self.row_of[image_id] = len(self.uris)
        self.uris.append(uri)
        self.file_names.append(file_name)
        self.widths.append(None)
        self.heights.append(None)
        return row


def recorded_size(value) -> int | None:
    """A recorded width or height; None (unknown) unless a positive whole number."""
    if type(value) is int and 0 < value <= INT64_MAX:
        return value
    if type(value) is float and value.is_integer() and 0 < value <= 2**53:
        return int(value)
    return None


def _tasks_from_coco(data: bytes, root: str, name: str) -> pa.Table:
    # A COCO-train-sized file parses into tens of millions of Python objects; the cyclic GC would
    # walk them all again and again while they are built (about half of the parse time). JSON
    # data has no cycles, so pause it; annotations are then flattened in one pass and grouped
    # by image with Arrow, not with per-image Python lists.
    with gc_paused():
        try:
            coco = storage.parse_json(data)
        except (ValueError, RecursionError) as error:  # RecursionError: nested deeper than JSON readers go
            raise ManifestError(f"{name} is neither Parquet nor valid JSON ({error})") from None
        del data
        if not isinstance(coco, dict) or not isinstance(coco.get("annotations"), list):
            raise ManifestError(f"{name} is not a COCO instances file: it has no 'annotations' list")
        images = _coco_images(coco.pop("images", None), root, name)
        rows, columns = flatten_annotations(coco.pop("annotations"), images, name)
    return _group_by_image(images, rows, columns)


@contextmanager
def gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _coco_images(records, root: str, name: str) -> _Images:
    images = _Images(root, name)
    for position, record in enumerate(image_records(records, name)):
        images.add(*image_fields(record, position, name))
    return images


def image_records(records, name: str) -> list:
    """The 'images' value of a COCO file as a list of records (none when absent or null)."""
    if records is None:
        return []  # no image records: every annotation is image_missing
    if not isinstance(records, list):
        raise ManifestError(f"'images' in {name} is {_kind(records)}, not a list of image records")
    return records


def image_fields(record, position: int, name: str) -> tuple:
    """A checked image record as (id, file_name, width, height), as written."""
    if not isinstance(record, dict):
        raise ManifestError(f"image #{position} in {name} is {_kind(record)}, not an object")
    image_id = record.get("id")
    if not _is_id(image_id):
        raise ManifestError(f"image #{position} in {name} has id {image_id!r}: {ID_RULE}")
    return image_id, record.get("file_name"), record.get("width"), record.get("height")


def flatten_annotations(
    annotations: list, images: _Images | None, name: str, first: int = 0
) -> tuple[np.ndarray, list[pa.Array]]:
    """Each annotation's image row (its image id when `images` is None), and the annotation
    columns, in file order; `annotations` start at position `first` of the file. Frees each parsed
    annotation as it goes."""
    rows, ids, category_ids, bboxes, iscrowd, segmentations = [], [], [], [], [], []
    row_of = images.row_of if images is not None else None
    for index, annotation in enumerate(annotations):
        position = first + index
        try:
            annotation_id, image_id = annotation["id"], annotation["image_id"]
        except (KeyError, TypeError, IndexError):
            raise ManifestError(_annotation_problem(annotation, position, name)) from None
        if type(image_id) is not int or type(annotation_id) is not int:
            raise ManifestError(_annotation_problem(annotation, position, name))
        if row_of is None:
            if not INT64_MIN <= image_id <= INT64_MAX:  # what images.unrecorded refuses
                raise ManifestError(f"annotation #{position} in {name} has image_id {image_id!r}: {ID_RULE}")
            rows.append(image_id)
        else:
            row = row_of.get(image_id)
            rows.append(images.unrecorded(image_id, position) if row is None else row)
        ids.append(annotation_id)
        category_ids.append(annotation.get("category_id"))
        bboxes.append(annotation.get("bbox"))
        iscrowd.append(annotation.get("iscrowd"))
        segmentations.append(_json_text(annotation.get("segmentation")))
        annotations[index] = None  # free the parsed annotation (its polygons) as we go
    columns = [
        _ids(ids, "annotation", "id", name, first),
        _category_ids(category_ids),
        _boxes(bboxes),
        pa.array([0 if not v else _flag(v) for v in iscrowd], pa.int64()),
        pa.array(segmentations, pa.string()),  # chunked when over 2 GiB of text
    ]
    return np.asarray(rows, np.int64), columns


def _json_text(segmentation) -> str:
    if not segmentation:
        return ""
    try:
        # decode() also copies the text out of orjson's over-allocated (kilobytes) output buffer
        return orjson.dumps(segmentation).decode()
    except TypeError:  # an integer beyond 64 bits: not a segmentation any decoder reads
        return "null"


def _annotation_problem(annotation, position: int, name: str) -> str:
    what = f"annotation #{position} in {name}"
    if not isinstance(annotation, dict):
        return f"{what} is {_kind(annotation)}, not an object"
    for key in ("id", "image_id"):
        if key not in annotation or annotation[key] is None:
            return f"{what} has no '{key}'"
        if not _is_id(annotation[key]):
            return f"{what} has {key} {annotation[key]!r}: {ID_RULE}"
    return f"{what} cannot be read"


def _is_id(value) -> bool:
    return type(value) is int and INT64_MIN <= value <= INT64_MAX


_KINDS = {
    dict: "an object",
    list: "a list",
    str: "text",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}


def _kind(value) -> str:
    """What a JSON value is, in words, with the start of its text."""
    if value is None:
        return "null"
    return f"{_KINDS.get(type(value), type(value).__name__)} ({str(value)[:40]!r})"


def _ids(values: list, record: str, key: str, name: str, first: int = 0) -> pa.Array:
    """Integer ids as int64 (the first at position `first`); one beyond 64 bits refuses the file."""
    try:
        return pa.array(values, pa.int64())
    except (OverflowError, pa.ArrowException):
        position = next(i for i, value in enumerate(values) if not _is_id(value))
        raise ManifestError(
            f"{record} #{first + position} in {name} has {key} {values[position]!r}: {ID_RULE}"
        ) from None


def _category_ids(values: list) -> pa.Array:
    """Whole numbers within 64 bits; anything else (2.5, "1", true) is null, as it is not part of
    an annotation's identity. Decided per value: Arrow alone would cut 2.5 to 2 in some lists."""
    if set(map(type, values)) <= {int, type(None)}:
        with contextlib.suppress(OverflowError, pa.ArrowException):
            return pa.array(values, pa.int64())
    return pa.array([v if _is_id(v) else None for v in values], pa.int64())


def _flag(value) -> int:
    """iscrowd as 0 or 1: anything but a non-zero number or true is 0."""
    return int(value is True or (type(value) in (int, float) and value == value and value != 0))


def _boxes(values: list) -> pa.Array:
    """`_box` of every value as a list<double> array; one Arrow conversion when all are 4 numbers
    (Arrow refuses text, and integers a double cannot hold exactly: those go one by one)."""
    with contextlib.suppress(pa.ArrowException, OverflowError, TypeError):
        boxes = pa.array(values, BOX_TYPE)
        lengths = pc.list_value_length(boxes)
        if (
            not boxes.null_count
            and not boxes.values.null_count
            and pc.all(pc.equal(lengths, 4)).as_py() is not False
        ):
            return boxes
    return pa.array([_box(value) for value in values], BOX_TYPE)


def _box(value) -> list[float]:
    if not isinstance(value, list | tuple) or len(value) != 4:
        return []
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError, OverflowError):
        return []


def _group_by_image(images: _Images, rows: np.ndarray, annotation_columns: list) -> pa.Table:
    """Task rows: images in the order of `images`' rows, each image's annotations in file order;
    `rows` is each annotation's image row, the annotations the whole file's."""
    image_columns = [  # in IMAGE_TASK's order
        pa.array(list(images.row_of), pa.int64()),  # ids in the order rows were made
        pa.array(images.uris, pa.string()),
        pa.array(images.file_names, pa.string()),
        pa.array(images.widths, pa.int64()),
        pa.array(images.heights, pa.int64()),
    ]
    return task_rows(image_columns, rows, annotation_columns, np.arange(len(rows), dtype=np.int64))


def task_rows(
    image_columns: list, rows: np.ndarray, annotation_columns: list, positions: np.ndarray
) -> pa.Table:
    """IMAGE_TASK rows of images in the order of `image_columns` (image id, URI, file name, width,
    height: one entry per image row), each image's annotations in the given order, split into rows
    of at most `annotations_per_row`; `rows` is each annotation's image row, `positions` its
    position in the file, `annotation_columns` those of `flatten_annotations`."""
    counts = np.bincount(rows, minlength=len(image_columns[0]))
    order = np.argsort(rows, kind="stable")  # annotations grouped by image, in given order within one
    kept = np.flatnonzero(counts)  # an image without annotations has nothing to refine
    if not len(kept):
        return IMAGE_TASK.empty_table()
    image_columns = [column.take(kept) for column in image_columns]
    limits = annotations_per_row(
        *(pc.fill_null(column, 0).to_numpy().astype(np.int64) for column in image_columns[-2:])
    )
    image_of_row, ends = _split(counts[kept], limits)
    if len(image_of_row) > len(kept):
        image_columns = [column.take(image_of_row) for column in image_columns]
    annotation_columns = [annotation_columns[0], pa.array(positions, pa.int64()), *annotation_columns[1:]]
    lengths = pc.binary_length(annotation_columns[-1]).to_numpy()
    text = np.cumsum(np.asarray(lengths, np.int64)[order])
    return _record_batches(image_columns, annotation_columns, order, ends, text)


def _split(counts: np.ndarray, limits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each task row's image (index into `counts`) and the end of its annotations, counted over
    all images' annotations in order; image i's `counts[i]` annotations go `limits[i]` at a time."""
    pieces = -(-counts // limits)
    image_of_row = np.repeat(np.arange(len(counts)), pieces)
    piece = np.arange(len(image_of_row)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    image_ends = np.cumsum(counts)
    starts = (image_ends - counts)[image_of_row]
    ends = np.minimum(starts + (piece + 1) * limits[image_of_row], image_ends[image_of_row])
    return image_of_row, ends


def _record_batches(
    image_columns: list, annotation_columns: list, order: np.ndarray, ends: np.ndarray, text: np.ndarray
) -> pa.Table:
    """The task table: row i holds annotations order[ends[i-1]:ends[i]]; `text` is the running
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


# ---------------------------------------------------------------- Parquet manifests


def _tasks_from_parquet(data: bytes, root: str, name: str) -> pa.Table:
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as error:
        raise ManifestError(
            f"{name} starts like Parquet but is no readable Parquet file ({one_line(error)})"
        ) from None
    check_parquet_columns(table.column_names, name)
    images = _Images(root, name)
    image_rows = parquet_image_rows(table, images, name)
    return _group_by_image(images, *parquet_annotations(table["annotations"], image_rows, name))


def check_parquet_columns(names: list[str], name: str) -> None:
    missing = {"image_id", "image_uri", "annotations"} - set(names)
    if missing:
        raise ManifestError(f"{name} is not an hqsam Parquet manifest: columns {sorted(missing)} are missing")


def parquet_annotations(annotations, image_rows: np.ndarray, name: str) -> tuple[np.ndarray, list]:
    """The image row of each annotation in the `annotations` column (image_rows: of each manifest
    row) and the annotation columns of `flatten_annotations`, in order."""
    if not pa.types.is_list(annotations.type) and not pa.types.is_large_list(annotations.type):
        raise _column_error(name, "annotations", annotations.type, "a list of annotation structs")
    values = pc.list_flatten(annotations)  # null lists hold no annotations
    if not pa.types.is_struct(values.type):
        raise _column_error(name, "annotations", annotations.type, "a list of annotation structs")
    rows = image_rows[pc.list_parent_indices(annotations).to_numpy()]
    return rows, _parquet_annotation_columns(values, name)


def parquet_image_rows(table: pa.Table, images: _Images, name: str) -> np.ndarray:
    """The image row of each manifest row, its record added to `images`: rows that repeat an
    image id are one image, as in a COCO file."""
    image_ids = _integer_column(table["image_id"], "image_id", name)
    if image_ids.null_count:
        row = pc.index(pc.is_null(image_ids), True).as_py()
        raise ManifestError(f"row #{row} of {name} has no image_id")
    uris = table["image_uri"]
    if not (
        pa.types.is_string(uris.type) or pa.types.is_large_string(uris.type) or pa.types.is_null(uris.type)
    ):
        raise _column_error(name, "image_uri", uris.type, "text")
    sizes = [_size_column(table, key, name) for key in ("width", "height")]
    rows = [
        images.add(image_id, uri, width, height)
        for image_id, uri, width, height in zip(image_ids.to_pylist(), uris.to_pylist(), *sizes)
    ]
    return np.asarray(rows, np.int64)


def _size_column(table: pa.Table, key: str, name: str) -> list:
    if key not in table.column_names:
        return [None] * table.num_rows
    column = table[key]
    if not (
        pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_null(column.type)
    ):
        raise _column_error(name, key, column.type, "a number of pixels")
    return column.to_pylist()


def _parquet_annotation_columns(values: pa.ChunkedArray, name: str) -> list:
    """The annotation columns of `flatten_annotations` from the manifest's flattened annotation structs."""
    fields = {field.name for field in values.type}
    if "id" not in fields:
        raise ManifestError(f"{name} is not an hqsam Parquet manifest: its annotations have no 'id'")
    ids = _integer_column(pc.struct_field(values, "id"), "annotations.id", name)
    if ids.null_count:
        position = pc.index(pc.is_null(ids), True).as_py()
        raise ManifestError(f"annotation #{position} in {name} has no 'id'")
    count = len(values)
    category_ids = pa.nulls(count, pa.int64())
    if "category_id" in fields:
        category_ids = _integer_column(
            pc.struct_field(values, "category_id"), "annotations.category_id", name
        )
    bboxes = pa.array([[]] * count, pa.list_(pa.float64()))
    if "bbox" in fields:
        bboxes = _parquet_boxes(pc.struct_field(values, "bbox"), name)
    iscrowd = pa.array(np.zeros(count, np.int64))
    if "iscrowd" in fields:
        iscrowd = _parquet_flags(pc.struct_field(values, "iscrowd"), name)
    segmentations = pa.array([""] * count, pa.string())
    if "segmentation" in fields:
        segmentations = _parquet_segmentations(pc.struct_field(values, "segmentation"), name)
    return [ids, category_ids, bboxes, iscrowd, segmentations]


def _integer_column(column, key: str, name: str):
    """An integer (or all-null) column as int64; ids are never taken from floats or text."""
    if pa.types.is_null(column.type):
        return column.cast(pa.int64())
    if not pa.types.is_integer(column.type):
        raise _column_error(name, key, column.type, "whole numbers")
    try:
        return column.cast(pa.int64())
    except pa.ArrowInvalid:
        raise ManifestError(f"column {key} of {name} holds values beyond 64 bits: {ID_RULE}") from None


def _parquet_boxes(column, name: str) -> pa.Array:
    kind = column.type
    if pa.types.is_null(kind):
        return pa.array([[]] * len(column), pa.list_(pa.float64()))
    listed = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    if not listed or not (pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)):
        raise _column_error(name, "annotations.bbox", kind, "a list of 4 numbers")
    return _boxes(column.to_pylist())


def _parquet_flags(column, name: str) -> pa.Array:
    if not (
        pa.types.is_integer(column.type) or pa.types.is_boolean(column.type) or pa.types.is_null(column.type)
    ):
        raise _column_error(name, "annotations.iscrowd", column.type, "0 or 1")
    flags = pc.fill_null(column.cast(pa.int64()), 0)
    return pc.cast(pc.not_equal(flags, 0), pa.int64())


def _parquet_segmentations(column, name: str) -> pa.Array:
    if pa.types.is_null(column.type):
        return pa.array([""] * len(column), pa.string())
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise _column_error(name, "annotations.segmentation", column.type, "COCO segmentation as JSON text")
    return pc.fill_null(column.cast(pa.string()), "")


def _column_error(name: str, key: str, found: pa.DataType, wanted: str) -> ManifestError:
    return ManifestError(f"column {key} of {name} is {found}, not {wanted} (schemas/manifest.py)")
