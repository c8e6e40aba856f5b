"""Stream a COCO instances file of any size into task rows (schemas/refine_rows.py IMAGE_TASK) as
Parquet parts, in memory that grows with the number of images only.

Two passes over the file with ijson (yajl's C parser): the first streams `images` into compact
arrays (ids, file names, sizes), the second streams `annotations` a chunk at a time, checks and
flattens each chunk with pipeline/manifest.py's own code, and spills it to local Arrow files, one
per range of image rows. Each range is then grouped into task rows and written as one part, so the
parts, read in name order, hold exactly the rows of `read_manifest`, in its order.

What yajl does not read (NaN, Infinity, numbers beyond 64 bits, invalid characters) makes the file
go through `read_manifest` whole, so it is read and refused exactly as there.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ijson
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hqsam.hqsam_core import storage
from hqsam.pipeline import manifest
from hqsam.pipeline.manifest import ManifestError

CHUNK = 65536  # annotations (or image records) parsed into Python objects at a time
SPILL_BYTES = 64 * 2**20  # about this much input JSON per range of image rows...
MAX_RANGES = 256  # ...in at most this many ranges (one open spill file each)
ROWS_PER_RANGE_WITHOUT_RECORDS = 65536
READ_BLOCK = 2**20
# yajl's refusals of what orjson or Python's json read (or refuse in their own words)
WHOLE_FILE_ERRORS = ("invalid char", "integer overflow", "numeric (floating point) overflow")
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


@dataclass
class StreamedManifest:
    parts: list[str] = field(default_factory=list)
    images: int = 0
    annotations: int = 0
    rows: int = 0


class _Whole(Exception):
    """yajl cannot read this file: read it whole, as read_manifest does."""


def stream_coco(
    uri: str,
    out_dir: str,
    images_root: str | None = None,
    progress: Callable[[int], None] | None = None,
    temp_dir: str | None = None,
) -> StreamedManifest:
    """Write the task rows of COCO file `uri` as out_dir/part-NNNNN.parquet; `progress(n)` hears
    of every n bytes read (the file is read twice)."""
    root = storage.parent(uri) if images_root is None else images_root
    name = storage.redact(uri)
    if not storage.exists(uri):
        raise ManifestError(f"annotation file {name} does not exist")
    if storage.list_files(out_dir, "part-*.parquet"):
        raise ManifestError(f"{storage.redact(out_dir)} already holds manifest parts; choose an empty folder")
    with _open(uri) as handle:
        if handle.read(4) == b"PAR1":
            return _write_whole(uri, out_dir, images_root)
    try:
        with tempfile.TemporaryDirectory(prefix="hqsam-manifest-", dir=temp_dir) as spill:
            return _stream(uri, out_dir, root, name, progress or (lambda n: None), Path(spill))
    except _Whole:
        return _write_whole(uri, out_dir, images_root)


def _stream(uri, out_dir, root, name, progress, spill: Path) -> StreamedManifest:
    index = _ImageIndex.read(uri, root, name, progress)
    if index.refusal is not None or not index.count:
        _check_structure(uri, name)  # what read_manifest refuses before any image record
        index.raise_refusal()
    fs, path = storage.url_to_fs(uri)
    size = fs.size(path)
    ranges = int(np.clip(size // SPILL_BYTES, 1, MAX_RANGES))
    per_range = -(-index.count // ranges) if index.count else ROWS_PER_RANGE_WITHOUT_RECORDS
    spiller = _Spiller(spill, per_range)
    total = 0
    with _open(uri, progress) as handle, spiller:
        for chunk in _chunks(_items(handle, "annotations.item", name)):
            keys, columns = manifest._flatten(chunk, None, name, total)
            spiller.add(index.rows_of(keys), np.arange(total, total + len(chunk)), columns)
            total += len(chunk)
    if not total:
        _check_structure(uri, name)
    result = StreamedManifest(images=int(np.count_nonzero(spiller.counts)), annotations=total)
    image_columns = index.columns()
    for number, (first, table) in enumerate(spiller.ranges()):
        image_range = [column.slice(first, per_range) for column in image_columns]
        rows = table["row"].to_numpy() - first
        columns = [table[key].combine_chunks() for key in SPILL_SCHEMA.names[2:]]
        tasks = manifest.task_rows(image_range, rows, columns, table["position"].to_numpy())
        result.parts.append(_write_part(out_dir, number, tasks))
        result.rows += tasks.num_rows
    return result


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
    unrecorded: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sorter = np.argsort(self.ids, kind="stable")

    @property
    def count(self) -> int:
        return len(self.ids)

    @classmethod
    def read(cls, uri: str, root: str, name: str, progress) -> _ImageIndex:
        """Pass 1: the whole file is parsed (a broken file is refused before any record is); a
        refused record is kept, to be raised once the annotations are known to be a list."""
        records: list[tuple] = []
        refusal = None
        with _open(uri, progress) as handle:
            for position, record in enumerate(_items(handle, "images.item", name)):
                if refusal is None:
                    try:
                        records.append(manifest.image_fields(record, position, name))
                    except ManifestError as error:
                        refusal = error
        ids, names, sizes = _image_columns(records)
        del records
        *columns, conflict = _first_and_last(ids, names, sizes, root, name)
        return cls(*columns, conflict or refusal)  # a conflict comes before the record refused

    def rows_of(self, image_ids: np.ndarray) -> np.ndarray:
        """The image row of each id; an id without a record gets the next new row."""
        order = self.sorter
        found = np.minimum(np.searchsorted(self.ids, image_ids, sorter=order), max(self.count - 1, 0))
        rows = np.full(len(image_ids), -1, np.int64)
        if self.count:
            hit = self.ids[order[found]] == image_ids
            rows[hit] = order[found[hit]]
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


def _image_columns(records: list[tuple]) -> tuple[np.ndarray, pa.Array, list[pa.Array]]:
    """Every record's id, file name (None unless non-empty text) and size (`manifest._size`)."""
    ids = np.fromiter((record[0] for record in records), np.int64, len(records))
    names = pa.array([r[1] if isinstance(r[1], str) and r[1] else None for r in records], pa.string())
    sizes = [pa.array([manifest._size(r[k]) for r in records], pa.int64()) for k in (2, 3)]
    return ids, names, sizes


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
    """Annotation columns spilled to one local Arrow stream per range of `per_range` image rows."""

    def __init__(self, folder: Path, per_range: int) -> None:
        self.folder, self.per_range = folder, per_range
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self.counts = np.zeros(0, np.int64)

    def __enter__(self) -> _Spiller:
        return self

    def __exit__(self, *exc) -> None:
        for writer in self.writers.values():
            writer.close()

    def add(self, rows: np.ndarray, positions: np.ndarray, columns: list) -> None:
        if len(rows):
            self.counts = np.pad(self.counts, (0, max(0, int(rows.max()) + 1 - len(self.counts))))
            np.add.at(self.counts, rows, 1)
        ranges = rows // self.per_range
        order = np.argsort(ranges, kind="stable")
        batch = pa.RecordBatch.from_arrays(
            [pa.array(rows), pa.array(positions), *columns], schema=SPILL_SCHEMA
        )
        sorted_ranges = ranges[order]
        cuts = np.flatnonzero(np.diff(sorted_ranges)) + 1
        for piece in np.split(order, cuts):
            if len(piece):
                self._writer(int(ranges[piece[0]])).write_batch(batch.take(pa.array(piece)))

    def _writer(self, number: int) -> pa.ipc.RecordBatchStreamWriter:
        if number not in self.writers:
            self.writers[number] = pa.ipc.new_stream(str(self.folder / f"{number:08d}.arrow"), SPILL_SCHEMA)
        return self.writers[number]

    def ranges(self) -> Iterator[tuple[int, pa.Table]]:
        """(first image row, its annotations in file order) per range, in row order."""
        for number in sorted(self.writers):
            path = self.folder / f"{number:08d}.arrow"
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
            yield number * self.per_range, table
            path.unlink()


def _check_structure(uri: str, name: str) -> None:
    """Without any annotation streamed: refuse what read_manifest refuses before the records (a
    root that is no object, 'annotations' that is no list, 'images' that is no list)."""
    found: dict[str, object] = {}
    with _open(uri) as handle:
        events = ijson.parse(handle, use_float=True)
        _prefix, event, _value = next(events)
        if event != "start_map":
            found["root"] = True
        for prefix, event, _value in events:
            if prefix in ("annotations", "images") and event not in ("map_key", "end_map", "end_array"):
                found[prefix] = event
    if "root" in found or found.get("annotations") != "start_array":
        raise ManifestError(f"{name} is not a COCO instances file: it has no 'annotations' list")
    if found.get("images") not in (None, "null", "start_array"):
        with _open(uri) as handle:
            records = next(ijson.items(handle, "images", use_float=True))
        manifest.image_records(records, name)


def _write_part(out_dir: str, number: int, tasks: pa.Table) -> str:
    uri = storage.join(out_dir, f"part-{number:05d}.parquet")
    with storage.atomic_writer(uri) as handle:
        pq.write_table(tasks, handle)
    return uri


def _write_whole(uri: str, out_dir: str, images_root: str | None) -> StreamedManifest:
    """Read the file whole with read_manifest (a Parquet manifest, or JSON that yajl cannot read)."""
    tasks = manifest.read_manifest(uri, images_root).tasks
    parts = [_write_part(out_dir, 0, tasks)] if tasks.num_rows else []
    return StreamedManifest(
        parts, manifest.image_count(tasks), manifest.annotation_count(tasks), tasks.num_rows
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


def _items(handle, prefix: str, name: str) -> Iterator:
    """ijson's items at `prefix`; what yajl cannot read raises _Whole, other broken JSON is refused."""
    try:
        yield from ijson.items(handle, prefix, use_float=True, buf_size=READ_BLOCK)
    except ijson.JSONError as error:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        if any(words in text for words in WHOLE_FILE_ERRORS):
            raise _Whole from None
        raise ManifestError(f"{name} is neither Parquet nor valid JSON ({text})") from None


def _chunks(items: Iterator) -> Iterator[list]:
    while chunk := list(itertools.islice(items, CHUNK)):
        yield chunk
