"""Stream a COCO instances file of any size into a TASK FOLDER: task rows (schemas/refine_rows.py
IMAGE_TASK) as Parquet parts, plus a record of their counts, in memory that grows with the number
of images only. `hqsam manifest` writes one; `hqsam refine` reads one (or streams its input into one).

The file is walked once with pipeline/json_walk.py (orjson, a window of array elements at a time):
`images` become compact arrays (ids, file names, sizes), and `annotations` that come after them are
checked and flattened a window at a time with pipeline/manifest.py's own code and spilled to local
Arrow files, one per range of image rows. Annotations before their images (or a later duplicate
'images' key, of which orjson keeps the last) are read a second time, window by window. Each range
is grouped into task rows; rows are written as parts that never split an image, so the parts, read
in name order, hold exactly the rows of `read_manifest`, in its order. The record goes last.

What orjson does not read but Python's json does (NaN, Infinity, a byte-order mark) makes the file
go through `read_manifest` whole, so it is read and refused exactly as there.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hqsam.hqsam_core import storage
from hqsam.pipeline import json_walk, manifest
from hqsam.pipeline.manifest import ManifestError
from hqsam.schemas.refine_rows import IMAGE_TASK

TASKS_RECORD = "_hqsam_manifest.json"  # written last into a task folder: its presence = complete
PARTS = 2000  # about this many parts at most: Ray Data reads one block per part
MIN_ROWS_PER_PART = 256
# The first parts are small and double in size up to the rule above: Ray Data hands a refine actor
# a part at a time and the driver hears of its rows once the whole part is written, so small first
# parts bring the first refined rows (and the progress line) back within seconds.
FIRST_PART_ROWS = 1
SPILL_BYTES = 32 * 2**20  # about this much input JSON per range of image rows...
MAX_RANGES = 256  # ...in at most this many ranges (one open spill file each)
ROWS_PER_RANGE_WITHOUT_RECORDS = 65536
ID_BUCKET_BYTES = 32 * 2**20  # about this much input JSON per bucket of annotation ids...
MAX_ID_BUCKETS = 128  # ...in at most this many buckets (a power of two)
DUPLICATE_EXAMPLES = 5
READ_BLOCK = 2**20
WRITERS = 16  # threads writing (and syncing or uploading) parts
PARQUET_BATCH = 65536  # rows of a Parquet manifest read at a time
SPILL_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("position", pa.int64()),
        ("id", pa.int64()),
        ("category_id", pa.int64()),
        ("bbox", pa.list_(pa.float64())),
        ("iscrowd", pa.int64()),
        ("segmentation", pa.string()),
    ]
)
ID_ROW = np.dtype([("id", "<i8"), ("row", "<i8")])
GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing spreads consecutive ids over buckets
MISSING = object()  # a root key the file does not have
LISTED = object()  # a root key whose value is a list (walked, not held)


@dataclass
class StreamedManifest:
    """A task folder's facts: its parts and what they hold."""

    parts: list[str] = field(default_factory=list)  # part URIs, in name order
    images: int = 0  # images with task rows (an image split into rows counts once)
    annotations: int = 0  # annotations in the task rows
    rows: int = 0  # task rows
    positions: int = 0  # annotations in the input file: every ann_index is below this
    duplicate_annotation_ids: dict = field(default_factory=dict)  # manifest.duplicate_annotation_ids
    source: str = ""  # the input URI, redacted
    limit: int | None = None  # only the first `limit` images (in task order) were kept

    def record(self) -> dict:
        """The folder's record (JSON-able); part names relative to the folder."""
        return {
            "parts": [part.rstrip("/").rsplit("/", 1)[-1] for part in self.parts],
            "images": self.images,
            "annotations": self.annotations,
            "rows": self.rows,
            "positions": self.positions,
            "duplicate_annotation_ids": self.duplicate_annotation_ids,
            "source": self.source,
            "limit": self.limit,
        }

    @classmethod
    def from_record(cls, record: dict, folder: str) -> StreamedManifest:
        fields = {key: record[key] for key in cls.__dataclass_fields__ if key in record}
        return cls(**fields | {"parts": [storage.join(folder, name) for name in record["parts"]]})


def read_task_folder(uri: str) -> StreamedManifest | None:
    """The task folder at `uri`, or None when `uri` is no folder holding TASKS_RECORD."""
    record_uri = storage.join(uri.rstrip("/"), TASKS_RECORD)
    if not storage.exists(record_uri):
        return None
    return StreamedManifest.from_record(storage.read_json(record_uri), uri.rstrip("/"))


def stream_coco(
    uri: str,
    out_dir: str,
    images_root: str | None = None,
    progress: Callable[[int], None] | None = None,
    temp_dir: str | None = None,
    limit: int | None = None,
) -> StreamedManifest:
    """Write the task folder of COCO file (or Parquet manifest) `uri` into the empty `out_dir`,
    only the first `limit` images' rows when given; `progress(n)` hears of every n bytes read
    (the file is read once; annotations before their images a second time, unreported)."""
    root = storage.parent(uri) if images_root is None else images_root
    name = storage.redact(uri)
    if not storage.exists(uri):
        raise ManifestError(f"annotation file {name} does not exist")
    _check_empty(out_dir)
    folder = manifest_parts(uri)
    if folder is not None:
        with tempfile.TemporaryDirectory(prefix="hqsam-manifest-", dir=temp_dir) as spill:
            result = _stream_parquet(folder, out_dir, root, name, progress, Path(spill), limit)
        return _finish(result, out_dir, name, limit)
    with _open(uri) as handle:
        parquet = handle.read(4) == b"PAR1"
    result = None
    with contextlib.suppress(json_walk.NotOrjson, _ReadWhole):
        with tempfile.TemporaryDirectory(prefix="hqsam-manifest-", dir=temp_dir) as spill:
            stream = _stream_parquet if parquet else _stream
            result = stream(uri, out_dir, root, name, progress, Path(spill), limit)
    if result is None:
        result = _write_whole(uri, out_dir, images_root, limit)
    return _finish(result, out_dir, name, limit)


def _finish(result: StreamedManifest, out_dir: str, name: str, limit: int | None) -> StreamedManifest:
    """The record written last: the folder is complete."""
    result.source, result.limit = name, limit
    storage.write_json(storage.join(out_dir, TASKS_RECORD), result.record())
    return result


def manifest_parts(uri: str) -> list[str] | None:
    """The Parquet files of a Parquet manifest given as a folder of parts (read in name order, as
    one manifest; names starting with _ or . skipped, as Parquet readers skip them); None when `uri`
    is no folder. ManifestError for a folder without any."""
    fs, path = storage.url_to_fs(uri)
    if not fs.isdir(path):
        return None
    parts = [part for part in storage.list_files(uri, "*.parquet") if part.rsplit("/", 1)[-1][0] not in "_."]
    if not parts:
        raise ManifestError(
            f"{storage.redact(uri)} is a folder without Parquet files or a task record ({TASKS_RECORD})"
        )
    return parts


def _check_empty(out_dir: str) -> None:
    files = storage.list_files(out_dir)
    held = [uri for uri in files if uri.rsplit("/", 1)[-1].startswith("part-") or uri.endswith(TASKS_RECORD)]
    if held:
        raise ManifestError(f"{storage.redact(out_dir)} already holds manifest parts; choose an empty folder")
    if files:
        raise ManifestError(f"{storage.redact(out_dir)} is not empty; choose an empty folder")


def _stream(uri, out_dir, root, name, progress, spill: Path, limit: int | None) -> StreamedManifest:
    fs, path = storage.url_to_fs(uri)
    walk = _CocoWalk(root, name, spill, fs.size(path))
    with manifest.gc_paused(), _open(uri, progress) as handle:  # JSON values hold no cycles
        for piece in _pieces(handle, name):
            walk.take(piece)
        spiller = walk.finish(uri)
    return _write_tasks(spiller, walk.index, out_dir, limit, walk.positions)


class _ReadWhole(Exception):
    """A Parquet manifest that read_manifest refuses: read it whole, to refuse it in its words."""


def _stream_parquet(uri, out_dir, root, name, progress, spill: Path, limit: int | None) -> StreamedManifest:
    """A Parquet manifest (schemas/manifest.py): a file, or a folder's files (a list) as one
    manifest, a batch of rows at a time: image columns first, then the annotations, spilled as
    those of a COCO file. A file that read_manifest refuses raises _ReadWhole, to be refused in its
    words; a folder's refusal is raised as it is."""
    files = uri if isinstance(uri, list) else [uri]
    size = sum(_size(file) for file in files)
    try:
        parquet = _ParquetFiles(files)
        manifest.check_parquet_columns(parquet.schema_arrow.names, name)
        index, image_rows = _parquet_index(parquet, root, name)
        spiller = _Spiller(spill, *_spill_shape(size, index.count))
        positions = 0
        for offset, batch in _batches(parquet, ["annotations"]):
            rows = image_rows[offset : offset + batch.num_rows]
            rows, columns = manifest.parquet_annotations(batch["annotations"], rows, name)
            spiller.add(rows, np.arange(positions, positions + len(rows)), columns)
            positions += len(rows)
    except (ManifestError, pa.ArrowException, OSError) as error:
        if not isinstance(uri, list):
            raise _ReadWhole from None
        if isinstance(error, ManifestError):
            raise
        raise ManifestError(f"{name} holds a Parquet file that cannot be read ({error})") from None
    spiller.close()
    if progress is not None:
        progress(size)
    return _write_tasks(spiller, index, out_dir, limit, positions)


def _size(uri: str) -> int:
    fs, path = storage.url_to_fs(uri)
    return fs.size(path)


class _ParquetFiles:
    """Parquet files read as one: the first file's schema, batches file after file."""

    def __init__(self, uris: list[str]) -> None:
        self.uris = uris
        with _open(uris[0]) as handle:
            self.schema_arrow = pq.ParquetFile(handle).schema_arrow

    def iter_batches(self, batch_size: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        for uri in self.uris:
            with _open(uri) as handle:
                yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=columns)


def _parquet_index(parquet: _ParquetFiles, root: str, name: str) -> tuple[_ImageIndex, np.ndarray]:
    """The image records of a Parquet manifest, and the image row of each of its rows."""
    images = manifest._Images(root, name)
    columns = [
        key for key in ("image_id", "image_uri", "width", "height") if key in parquet.schema_arrow.names
    ]
    rows = [manifest.parquet_image_rows(batch, images, name) for _offset, batch in _batches(parquet, columns)]
    ids = np.fromiter(images.row_of, np.int64, len(images.row_of))
    strings = [pa.array(values, pa.string()) for values in (images.file_names, images.uris)]
    sizes = [pa.array(values, pa.int64()) for values in (images.widths, images.heights)]
    image_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return _ImageIndex(ids, *strings, *sizes, None), image_rows


def _batches(parquet: _ParquetFiles, columns: list[str]) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row, the rows) of `columns`, PARQUET_BATCH rows at a time."""
    offset = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
        yield offset, batch
        offset += batch.num_rows


def _pieces(handle, name: str) -> Iterator[json_walk.Piece]:
    try:
        yield from json_walk.walk(handle)
    except json_walk.BrokenJson as error:
        raise ManifestError(f"{name} is neither Parquet nor valid JSON ({error})") from None


class _CocoWalk:
    """What the walk found at the root, as `read_manifest` would use it: orjson keeps the last of a
    repeated key. Annotations met after their (so far last) images are spilled at once."""

    def __init__(self, root: str, name: str, spill: Path, size: int) -> None:
        self.root, self.name, self.spill, self.size = root, name, spill, size
        self.images, self.annotations = MISSING, MISSING
        self.records = _ImageRecords(name)
        self.index = self.records.index(root, name)
        self.images_seen = 0  # 'images' keys met so far
        self.spans: list[tuple[int, int]] = []  # the last annotations array, window by window
        self.positions = 0
        self.spiller: _Spiller | None = None
        self.spilled_after = -1  # images_seen when the spilled annotations began
        self.refusal: ManifestError | None = None

    def take(self, piece: json_walk.Piece) -> None:
        if piece.key == "images":
            self._images(piece)
        elif piece.key == "annotations":
            self._annotations(piece)

    def _images(self, piece: json_walk.Piece) -> None:
        if piece.kind in ("value", "open"):
            self.images_seen += 1
            self.images = LISTED if piece.kind == "open" else piece.value
            self.records = _ImageRecords(self.name)
        if piece.kind == "items":
            self.records.add(piece.value)
        elif piece.kind in ("value", "close"):
            self.index = self.records.index(self.root, self.name)

    def _annotations(self, piece: json_walk.Piece) -> None:
        if piece.kind in ("value", "open"):
            self.annotations = LISTED if piece.kind == "open" else piece.value
            self.spans, self.positions, self.refusal = [], 0, None
            if self.spiller is not None:
                self.spiller.close()
            self.spiller = self._spiller() if piece.kind == "open" and self.images_seen else None
            self.spilled_after = self.images_seen
        elif piece.kind == "items":
            self.spans.append((piece.start, piece.end))
            if self.spiller is not None and self.refusal is None:
                try:
                    self._spill(piece.value)
                except ManifestError as error:  # raised once the rest of the file is known valid
                    self.refusal = error
            self.positions += len(piece.value)

    def finish(self, uri: str) -> _Spiller:
        """The spilled annotations, once the file is known to be valid JSON; raises what
        read_manifest refuses, in its order (structure, image records, annotations)."""
        if self.annotations is not LISTED:
            raise ManifestError(f"{self.name} is not a COCO instances file: it has no 'annotations' list")
        if self.images is not MISSING and self.images is not LISTED:
            manifest.image_records(self.images, self.name)
        self.index.raise_refusal()
        if self.spiller is None or self.spilled_after != self.images_seen:
            self._replay(uri)
        if self.refusal is not None:
            raise self.refusal
        self.spiller.close()
        return self.spiller

    def _replay(self, uri: str) -> None:
        """Spill the last annotations array again, now that the last images are known."""
        if self.spiller is not None:
            self.spiller.close()
        self.index.unrecorded.clear()
        self.spiller, self.positions = self._spiller(), 0
        with _open(uri) as handle:
            for start, end in self.spans:
                handle.seek(start)
                values = orjson.loads(b"[" + handle.read(end - start) + b"]")
                self._spill(values)
                self.positions += len(values)

    def _spiller(self) -> _Spiller:
        folder = self.spill / f"pass-{self.images_seen}-{len(list(self.spill.iterdir()))}"
        folder.mkdir()
        return _Spiller(folder, *_spill_shape(self.size, self.index.count))

    def _spill(self, values: list) -> None:
        keys, columns = manifest.flatten_annotations(values, None, self.name, self.positions)
        positions = np.arange(self.positions, self.positions + len(keys))
        self.spiller.add(self.index.rows_of(keys), positions, columns)


class _ImageRecords:
    """Image records as arrays, converted a window of records at a time; the first refused record
    ends it (the refusal is raised once the annotations are known to be a list)."""

    def __init__(self, name: str) -> None:
        self.name, self.count, self.refusal = name, 0, None
        self.ids: list[np.ndarray] = []
        self.names: list[pa.Array] = []
        self.widths: list[pa.Array] = []
        self.heights: list[pa.Array] = []

    def add(self, records: list) -> None:
        fields = []
        for record in records if self.refusal is None else ():
            try:
                fields.append(manifest.image_fields(record, self.count + len(fields), self.name))
            except ManifestError as error:
                self.refusal = error
                break
        self.count += len(records)
        if fields:
            self.ids.append(np.fromiter((f[0] for f in fields), np.int64, len(fields)))
            self.names.append(
                pa.array([f[1] if isinstance(f[1], str) and f[1] else None for f in fields], pa.string())
            )
            self.widths.append(pa.array([manifest.recorded_size(f[2]) for f in fields], pa.int64()))
            self.heights.append(pa.array([manifest.recorded_size(f[3]) for f in fields], pa.int64()))

    def index(self, root: str, name: str) -> _ImageIndex:
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)
        names, widths, heights = (
            pa.concat_arrays(arrays) if arrays else pa.array([], kind)
            for arrays, kind in (
                (self.names, pa.string()),
                (self.widths, pa.int64()),
                (self.heights, pa.int64()),
            )
        )
        *columns, conflict = _first_and_last(ids, names, [widths, heights], root, name)
        return _ImageIndex(*columns, conflict or self.refusal)  # a conflict comes before the record refused


@dataclass
class _ImageIndex:
    """The image records as arrays, one entry per image row (in the order ids are first seen),
    then the ids of annotations without a record, in the order first met."""

    ids: np.ndarray
    file_names: pa.Array
    uris: pa.Array
    widths: pa.Array
    heights: pa.Array
    refusal: ManifestError | None
    sorter: np.ndarray = field(init=False)
    sorted_ids: np.ndarray = field(init=False)
    unrecorded: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sorter = np.argsort(self.ids, kind="stable")
        self.sorted_ids = self.ids[self.sorter]

    @property
    def count(self) -> int:
        return len(self.ids)

    def rows_of(self, image_ids: np.ndarray) -> np.ndarray:
        """The image row of each id; an id without a record gets the next new row."""
        found = np.minimum(np.searchsorted(self.sorted_ids, image_ids), max(self.count - 1, 0))
        rows = np.full(len(image_ids), -1, np.int64)
        if self.count:
            hit = self.sorted_ids[found] == image_ids
            rows[hit] = self.sorter[found[hit]]
        for position in np.flatnonzero(rows < 0):
            image_id = int(image_ids[position])
            rows[position] = self.unrecorded.setdefault(image_id, self.count + len(self.unrecorded))
        return rows

    def raise_refusal(self) -> None:
        if self.refusal is not None:
            raise self.refusal

    def columns(self) -> list[pa.Array]:
        """IMAGE_TASK's image columns, one entry per image row."""
        extra = len(self.unrecorded)
        return [
            pa.array(np.concatenate([self.ids, np.fromiter(self.unrecorded, np.int64, extra)])),
            pa.concat_arrays([self.uris, pa.nulls(extra, pa.string())]),
            pa.concat_arrays([self.file_names, pa.nulls(extra, pa.string())]),
            pa.concat_arrays([self.widths, pa.nulls(extra, pa.int64())]),
            pa.concat_arrays([self.heights, pa.nulls(extra, pa.int64())]),
        ]


def _first_and_last(ids, names: pa.Array, sizes: list, root: str, name: str):
    """Per id in the order first seen: the first record's file name and URI, the last record's
    size; a later record naming another file refuses the file, as `manifest._Images.add` does."""
    uris = _uris(names, root)
    order = np.argsort(ids, kind="stable")
    starts = np.ones(len(ids), bool)
    starts[1:] = ids[order][1:] != ids[order][:-1]
    group = np.cumsum(starts) - 1
    first = order[starts]  # per id (sorted by id): its first record
    last = order[np.r_[np.flatnonzero(starts)[1:], len(ids)] - 1] if len(ids) else first
    first_uri = uris.take(pa.array(first[group]))
    conflict = pc.fill_null(pc.not_equal(uris.take(pa.array(order)), first_uri), True)
    same_nulls = pc.and_(pc.is_null(uris.take(pa.array(order))), pc.is_null(first_uri))
    conflict = np.asarray(pc.and_not(conflict, same_nulls), bool)
    refusal = None
    if conflict.any():
        at = int(order[conflict].min())
        earlier = uris[int(first[group[np.flatnonzero(order == at)[0]]])].as_py()
        refusal = ManifestError(
            f"image id {int(ids[at])} has two records in {name} naming different files "
            f"({earlier!r} and {uris[at].as_py()!r})"
        )
    first, last = np.sort(first), last[np.argsort(first, kind="stable")]  # in the order first seen
    first_rows, last_rows = pa.array(first), pa.array(last)
    columns = (
        names.take(first_rows),
        uris.take(first_rows),
        sizes[0].take(last_rows),
        sizes[1].take(last_rows),
    )
    return (ids[first], *columns, refusal)


def _uris(names: pa.Array, root: str) -> pa.Array:
    """`storage.join(root, name)` of every name, vectorized (nulls stay null)."""
    base = root.rstrip("/") if root else ""
    prefix = f"{base}/" if base else ""
    absolute = pc.or_(pc.match_substring(names, "://"), pc.starts_with(names, "/"))
    joined = pc.binary_join_element_wise(pa.scalar(prefix), names, "")
    return pc.if_else(absolute, names, joined)


class _Spiller:
    """Annotation columns spilled to one local Arrow stream per range of `per_range` image rows,
    and (annotation id, image row) pairs to `buckets` files by a hash of the id."""

    def __init__(self, folder: Path, per_range: int, buckets: int) -> None:
        self.folder, self.per_range, self.bits = folder, per_range, buckets.bit_length() - 1
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self.id_files: dict[int, object] = {}
        self.counts = np.zeros(0, np.int64)  # annotations per image row

    def close(self) -> None:
        for handle in [*self.writers.values(), *self.id_files.values()]:
            handle.close()

    def add(self, rows: np.ndarray, positions: np.ndarray, columns: list) -> None:
        if len(rows):
            self.counts = np.pad(self.counts, (0, max(0, int(rows.max()) + 1 - len(self.counts))))
            np.add.at(self.counts, rows, 1)
        batch = pa.RecordBatch.from_arrays(
            [pa.array(rows), pa.array(positions), *columns], schema=SPILL_SCHEMA
        )
        for number, piece in _groups(rows // self.per_range):
            self._writer(number).write_batch(batch.take(pa.array(piece)))
        pairs = np.empty(len(rows), ID_ROW)
        pairs["id"], pairs["row"] = columns[0].to_numpy(zero_copy_only=False), rows
        hashes = pairs["id"].view(np.uint64) * GOLDEN >> np.uint64(64 - self.bits) if self.bits else rows * 0
        for number, piece in _groups(hashes.astype(np.int64)):
            if number not in self.id_files:
                self.id_files[number] = open(self.folder / f"ids-{number:05d}.bin", "wb")  # noqa: SIM115
            self.id_files[number].write(pairs[piece].tobytes())

    def _writer(self, number: int) -> pa.ipc.RecordBatchStreamWriter:
        if number not in self.writers:
            self.writers[number] = pa.ipc.new_stream(str(self.folder / f"{number:08d}.arrow"), SPILL_SCHEMA)
        return self.writers[number]

    def ranges(self, end_row: int) -> Iterator[tuple[int, pa.Table]]:
        """(first image row, its annotations in file order) per range, in row order, of the image
        rows before `end_row`."""
        for number in sorted(self.writers):
            first = number * self.per_range
            if first >= end_row:
                return
            path = self.folder / f"{number:08d}.arrow"
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
            if first + self.per_range > end_row:
                table = table.filter(pc.less(table["row"], end_row))
            yield first, table
            path.unlink()

    def duplicates(self, end_row: int) -> dict:
        """`manifest.duplicate_annotation_ids` of the annotations of image rows before `end_row`,
        one bucket of ids at a time."""
        found, annotations, examples = 0, 0, []
        for number in sorted(self.id_files):
            pairs = np.fromfile(self.folder / f"ids-{number:05d}.bin", ID_ROW)
            values, counts = np.unique(pairs["id"][pairs["row"] < end_row], return_counts=True)
            repeated = counts > 1
            found, annotations = found + int(repeated.sum()), annotations + int(counts[repeated].sum())
            examples = sorted(examples + values[repeated][:DUPLICATE_EXAMPLES].tolist())[:DUPLICATE_EXAMPLES]
        return {"ids": found, "annotations": annotations, "examples": examples}


def _spill_shape(size: int, images: int) -> tuple[int, int]:
    """Image rows per spill range, and buckets of annotation ids, for an input of `size` bytes."""
    ranges = int(np.clip(size // SPILL_BYTES, 1, MAX_RANGES))
    per_range = -(-images // ranges) if images else ROWS_PER_RANGE_WITHOUT_RECORDS
    buckets = int(np.clip(size // ID_BUCKET_BYTES, 1, MAX_ID_BUCKETS))
    return per_range, 1 << (buckets.bit_length() - 1)


def _groups(keys: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(key, the indices holding it, in order) per distinct key."""
    order = np.argsort(keys, kind="stable")
    cuts = np.flatnonzero(np.diff(keys[order])) + 1
    for piece in np.split(order, cuts):
        if len(piece):
            yield int(keys[piece[0]]), piece


def _write_tasks(
    spiller: _Spiller, index: _ImageIndex, out_dir: str, limit, positions: int
) -> StreamedManifest:
    end_row = _end_row(spiller.counts, limit)
    counts = spiller.counts[:end_row]
    image_columns = index.columns()
    parts = _Parts(out_dir, _rows_per_part(counts, image_columns))
    for first, table in spiller.ranges(end_row):
        image_range = [column.slice(first, spiller.per_range) for column in image_columns]
        rows = table["row"].to_numpy() - first
        columns = [table[key].combine_chunks() for key in SPILL_SCHEMA.names[2:]]
        parts.add(manifest.task_rows(image_range, rows, columns, table["position"].to_numpy()))
    parts.close()
    images, annotations = int(np.count_nonzero(counts)), int(counts.sum())
    return StreamedManifest(
        parts.uris, images, annotations, parts.rows, positions, spiller.duplicates(end_row)
    )


def _end_row(counts: np.ndarray, limit: int | None) -> int:
    """The image rows to keep: those before the row after the `limit`-th image with annotations."""
    kept = np.flatnonzero(counts)
    if limit is None or limit >= len(kept):
        return len(counts)
    return int(kept[limit - 1]) + 1 if limit > 0 else 0


def _rows_per_part(counts: np.ndarray, image_columns: list) -> int:
    """Rows per part for about PARTS parts: `counts` annotations on each image row make
    ceil(count / annotations_per_row) task rows each, as `manifest.task_rows` splits them."""
    sizes = [
        pc.fill_null(column.slice(0, len(counts)), 0).to_numpy().astype(np.int64)
        for column in image_columns[-2:]
    ]
    rows = int((-(-counts // manifest.annotations_per_row(*sizes))).sum())
    return max(MIN_ROWS_PER_PART, -(-rows // PARTS))


class _Parts:
    """Task rows (given in order) written as parts of at most `per_part` rows that never split an
    image: an image with more rows gets a part of its own."""

    def __init__(self, out_dir: str, per_part: int) -> None:
        self.out_dir, self.per_part = out_dir, per_part
        self.limit = min(FIRST_PART_ROWS, per_part)  # rows of the next part: doubles to per_part
        storage.make_folder(out_dir)
        self.uris: list[str] = []
        self.rows = 0
        self.pending = IMAGE_TASK.empty_table()
        self.writers = ThreadPoolExecutor(WRITERS, thread_name_prefix="hqsam-part")
        self.written: list[Future] = []

    def add(self, tasks: pa.Table) -> None:
        table = pa.concat_tables([self.pending, tasks])
        ids = table["image_id"].to_numpy()
        ends = np.r_[np.flatnonzero(ids[1:] != ids[:-1]) + 1, len(ids)]  # where each image's rows end
        start = 0
        while len(ids) - start > self.limit:
            at = np.searchsorted(ends, start + self.limit, side="right") - 1
            cut = (
                int(ends[at])
                if at >= 0 and ends[at] > start
                else int(ends[np.searchsorted(ends, start, "right")])
            )
            self._write(table.slice(start, cut - start))
            start = cut
        self.pending = table.slice(start)

    def close(self) -> None:
        if self.pending.num_rows:
            self._write(self.pending)
        with self.writers:
            for written in self.written:
                written.result()

    def _write(self, tasks: pa.Table) -> None:
        # Parts are written (and synced) by threads: with ~2000 small parts, waiting for each
        # file's sync in turn would take longer than reading the input.
        if len(self.written) >= 2 * WRITERS:
            self.written.pop(0).result()
        uri = storage.join(self.out_dir, f"part-{len(self.uris):05d}.parquet")
        self.written.append(self.writers.submit(_write_part, uri, tasks))
        self.uris.append(uri)
        self.rows += tasks.num_rows
        self.limit = min(2 * self.limit, self.per_part)


def _write_part(uri: str, tasks: pa.Table) -> None:
    # Not synced or renamed into place: nothing reads a part before the folder's record, written
    # last, names it.
    fs, path = storage.url_to_fs(uri)
    pq.write_table(tasks, path, filesystem=fs)


def _write_whole(uri: str, out_dir: str, images_root: str | None, limit: int | None) -> StreamedManifest:
    """Read the file whole with read_manifest (a Parquet manifest, or JSON that only Python's
    json reads)."""
    tasks = manifest.read_manifest(uri, images_root).tasks
    positions = manifest.annotation_count(tasks)
    if limit is not None:
        tasks = manifest.first_images(tasks, limit)
    parts = _Parts(out_dir, max(MIN_ROWS_PER_PART, -(-tasks.num_rows // PARTS)))
    parts.add(tasks)
    parts.close()
    return StreamedManifest(
        parts.uris,
        manifest.image_count(tasks),
        manifest.annotation_count(tasks),
        parts.rows,
        positions,
        manifest.duplicate_annotation_ids(tasks),
    )


class _Counted:
    """A binary file that reports the bytes read from it."""

    def __init__(self, handle, progress: Callable[[int], None]) -> None:
        self.handle, self.progress = handle, progress

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.progress(len(data))
        return data


@contextlib.contextmanager
def _open(uri: str, progress: Callable[[int], None] | None = None):
    """`uri` opened for reading in blocks (local or remote), its bytes counted by `progress`."""
    fs, path = storage.url_to_fs(uri)
    with fs.open(path, "rb", block_size=READ_BLOCK) as handle:
        yield _Counted(handle, progress) if progress else handle
