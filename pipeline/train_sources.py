"""The reader of training and evaluation data: sources -> light sample rows (`SAMPLE_SOURCE`).

A source is one of
- an image + gt folder pair in the HQSeg-44K layout: `SRC/im/*.jpg|jpeg|png` and `SRC/gt/*.png`
  matched by file stem, one object per gt;
- a COCO instances JSON: one sample per non-crowd instance with a segmentation; images relative to
  the file's folder or to `::images=ROOT`;
- a Parquet output of `hqsam refine` (its OUT folder, OUT/rows, or one part file): rows with status
  ok whose score is at least `min_score`;
each local or on object storage, optionally `SRC::weight=W` (an epoch holds each of its samples W
times; a fractional part picks that share of them at random) and `SRC::original=URI` (the data's
original annotation, compared with the GT by `hqsam evaluate`: a folder of PNGs by stem for a folder
pair, a COCO file with the same annotations for a COCO source, each matched by image id, annotation id
and, where an id repeats on an image, its order there).

A sample's key is `SRC#<annotation id>`, or `SRC#<annotation id>@<position in the input>` where the
id repeats in the source (merged datasets repeat ids), so that keys stay unique.

Listing and parsing happen once on the driver and give light rows (URIs and annotation text, no
pixels, declared in `schemas/train_rows.py`); `pipeline/load_samples.py` turns them into pixels
wherever it runs (a Ray Data task, an evaluator).
"""

from __future__ import annotations

import io
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError
from hqsam.pipeline.manifest import ManifestError, read_manifest
from hqsam.pipeline.read_refined import ROWS_FOLDER, read_part_files, refined_parts
from hqsam.schemas.status import Status
from hqsam.schemas.train_rows import SAMPLE_SOURCE

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
KINDS = ("folders", "coco", "refined")


class SourceError(HqsamError, ValueError):
    """A data source that cannot be used; the message is one sentence."""


@dataclass(frozen=True)
class Source:
    uri: str
    kind: str  # one of KINDS
    weight: float = 1.0
    images: str | None = None  # COCO: root that file_name is relative to
    original: str | None = None
    text: str = field(default="", compare=False)  # as given on the command line

    @property
    def name(self) -> str:
        return self.uri.rstrip("/")


def parse_source(text: str) -> Source:
    """`URI[::weight=W][::images=ROOT][::original=URI]` -> Source, its kind detected from storage."""
    uri, *options = text.split("::")
    if not uri:
        raise SourceError(f"data source {text!r} has no path")
    settings: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ("weight", "images", "original") or not value:
            raise SourceError(
                f"data source {text!r}: unknown option {option!r} (use ::weight=W, ::images=ROOT, ::original=URI)"
            )
        settings[key] = value
    weight = 1.0
    if "weight" in settings:
        try:
            weight = float(settings["weight"])
        except ValueError:
            weight = -1.0
        if not weight > 0 or not np.isfinite(weight):
            raise SourceError(f"data source {text!r}: weight must be a positive number")
    kind = detect_kind(uri)
    if "images" in settings and kind != "coco":
        raise SourceError(f"data source {text!r}: ::images= applies to COCO files only")
    if "original" in settings and kind == "refined":
        raise SourceError(f"data source {text!r}: ::original= applies to folder pairs and COCO files only")
    return Source(uri, kind, weight, settings.get("images"), settings.get("original"), text)


def detect_kind(uri: str) -> str:
    fs, path = storage.url_to_fs(uri)
    lowered = path.lower()
    if lowered.endswith(".json"):
        if not fs.exists(path):
            raise SourceError(f"data source {uri} does not exist")
        return "coco"
    if lowered.endswith(".parquet"):
        if not fs.exists(path):
            raise SourceError(f"data source {uri} does not exist")
        return "refined"
    if not fs.isdir(path):
        raise SourceError(f"data source {uri} is neither a folder, a COCO .json nor a .parquet file")
    if fs.isdir(f"{path.rstrip('/')}/im") and fs.isdir(f"{path.rstrip('/')}/gt"):
        return "folders"
    if refined_parts(uri):
        return "refined"
    raise SourceError(
        f"data source {uri} is a folder with neither im/ + gt/ subfolders nor the "
        f"{ROWS_FOLDER}/part-*.parquet files of `hqsam refine`"
    )


def source_rows(source: Source, *, min_score: float | None = None) -> pa.Table:
    """The light sample rows of one source, weight not applied (SAMPLE_SOURCE schema)."""
    if source.kind == "folders":
        return _folder_rows(source)
    if source.kind == "coco":
        return _coco_rows(source)
    return _refined_rows(source, min_score)


def merge_sources(
    sources: list[Source], *, min_score: float | None = None, seed: int = 0
) -> tuple[pa.Table, dict[str, int]]:
    """All sources' rows with weights applied, and the number of distinct samples per source."""
    tables, counts = [], {}
    rng = np.random.default_rng(seed)
    for source in sources:
        rows = source_rows(source, min_score=min_score)
        if rows.num_rows == 0:
            raise SourceError(f"data source {source.text or source.uri} holds no usable samples")
        counts[source.name] = rows.num_rows
        tables.append(apply_weight(rows, source.weight, rng))
    if not tables:
        raise SourceError("no data source given")
    return pa.concat_tables(tables), counts


def apply_weight(rows: pa.Table, weight: float, rng: np.random.Generator) -> pa.Table:
    """Each row floor(W) times plus a random frac(W) share once more; copies get distinct keys."""
    whole, fraction = int(weight), weight - int(weight)
    copies = [np.arange(rows.num_rows)] * whole
    if fraction > 0:
        extra = rng.permutation(rows.num_rows)[: int(round(fraction * rows.num_rows))]
        copies.append(np.sort(extra))
    parts = []
    for copy, indices in enumerate(copies):
        if not len(indices):
            continue
        part = rows.take(pa.array(indices))
        if copy:
            keys = pc.binary_join_element_wise(part["key"], pa.scalar(f"#{copy}"), "")
            index = part.schema.get_field_index("key")
            part = part.set_column(index, part.schema.field(index), keys)
        parts.append(part)
    return pa.concat_tables(parts) if parts else rows.slice(0, 0)


def _list(uri: str, suffixes: tuple[str, ...]) -> dict[str, str]:
    """stem -> URI of the files directly in a folder whose names end in one of `suffixes`."""
    fs, path = storage.url_to_fs(uri)
    if not fs.isdir(path):
        raise SourceError(f"{uri} is not a folder")
    found: dict[str, str] = {}
    # One listing request (list_files would ask the store about each entry: 44k requests for HQSeg).
    for name in storage.list_folder(uri):
        base = posixpath.basename(name)
        stem, suffix = posixpath.splitext(base)
        if suffix.lower() not in suffixes or base.startswith("."):
            continue
        if stem in found:
            raise SourceError(f"{uri} holds two files with the stem {stem!r}")
        found[stem] = name
    return found


def _folder_rows(source: Source) -> pa.Table:
    root = source.uri.rstrip("/")
    images = _list(f"{root}/im", IMAGE_SUFFIXES)
    masks = _list(f"{root}/gt", (".png",))
    originals = _list(source.original, (".png",)) if source.original else {}
    stems = sorted(images.keys() & masks.keys())
    if len(stems) < len(images) or len(stems) < len(masks):
        log.warning(
            "%s: %d images without a gt and %d gts without an image are left out",
            root,
            len(images.keys() - masks.keys()),
            len(masks.keys() - images.keys()),
        )
    return _table(
        source=[source.name] * len(stems),
        key=[f"{source.name}#{stem}" for stem in stems],
        image_uri=[images[s] for s in stems],
        mask_uri=[masks[s] for s in stems],
        original_uri=[originals.get(s) for s in stems],
    )


def _coco_rows(source: Source) -> pa.Table:
    try:
        tasks = read_manifest(source.uri, source.images).tasks
    except ManifestError as error:
        raise SourceError(str(error)) from None
    originals = _coco_segmentations(source.original) if source.original else {}
    repeated = _repeated(pc.list_flatten(tasks["ann_ids"]))
    seen: Counter = Counter()  # (image_id, annotation id) -> annotations met so far, in file order
    columns: dict[str, list] = {name: [] for name in SAMPLE_SOURCE.names}
    for task in tasks.to_pylist():
        for k, annotation_id in enumerate(task["ann_ids"]):
            ids = (task["image_id"], annotation_id)
            occurrence, seen[ids] = seen[ids], seen[ids] + 1
            if task["image_uri"] is None or task["iscrowd"][k] or not task["segmentations"][k]:
                continue
            matches = originals.get(ids, [])
            _append(
                columns,
                source=source.name,
                key=_key(source.name, annotation_id, task["ann_indices"][k], repeated),
                image_uri=task["image_uri"],
                segmentation=task["segmentations"][k],
                original_segmentation=matches[occurrence] if occurrence < len(matches) else None,
                height=task["height"],
                width=task["width"],
                image_id=task["image_id"],
                annotation_id=annotation_id,
                category_id=task["category_ids"][k],
            )
    return pa.Table.from_pydict(columns, schema=SAMPLE_SOURCE)


def _coco_segmentations(uri: str) -> dict[tuple, list[str | None]]:
    """(image_id, annotation id) -> the segmentations (JSON text, None when absent) of the original
    file's annotations with those ids, in file order: ids may repeat, even on one image."""
    try:
        coco = storage.read_json(uri)
    except (FileNotFoundError, ValueError) as error:
        raise SourceError(f"original annotations {uri} are not a readable COCO file ({error})") from None
    found: dict[tuple, list[str | None]] = {}
    for a in coco.get("annotations", []):
        if isinstance(a, dict):
            text = orjson.dumps(a["segmentation"]).decode() if a.get("segmentation") else None
            found.setdefault((a.get("image_id"), a.get("id")), []).append(text)
    return found


def _repeated(annotation_ids) -> set[int]:
    """The annotation ids that more than one annotation carries."""
    counts = pc.value_counts(annotation_ids)
    return set(counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist())


def _key(name: str, annotation_id: int, position: int, repeated: set[int]) -> str:
    return f"{name}#{annotation_id}@{position}" if annotation_id in repeated else f"{name}#{annotation_id}"


def _refined_rows(source: Source, min_score: float | None) -> pa.Table:
    columns = ["image_id", "image_uri", "annotation_id", "ann_index", "category_id", "segmentation"]
    columns += ["score", "status"]
    if source.uri.lower().endswith(".parquet"):
        table = pq.read_table(io.BytesIO(storage.read_bytes(source.uri)), columns=columns)
    else:
        table = read_part_files(refined_parts(source.uri), columns)
    repeated = _repeated(table["annotation_id"])
    keep = pc.equal(table["status"], Status.OK.value)
    if min_score is not None:
        keep = pc.and_(keep, pc.greater_equal(pc.fill_null(table["score"], -1.0), min_score))
    rows = table.filter(keep).to_pylist()
    return _table(
        source=[source.name] * len(rows),
        key=[_key(source.name, r["annotation_id"], r["ann_index"], repeated) for r in rows],
        image_uri=[r["image_uri"] for r in rows],
        segmentation=[orjson.dumps(r["segmentation"]).decode() for r in rows],
        height=[r["segmentation"]["size"][0] for r in rows],
        width=[r["segmentation"]["size"][1] for r in rows],
        image_id=[r["image_id"] for r in rows],
        annotation_id=[r["annotation_id"] for r in rows],
        category_id=[r["category_id"] for r in rows],
    )


def _append(columns: dict[str, list], **values) -> None:
    for name in SAMPLE_SOURCE.names:
        columns[name].append(values.get(name))


def _table(**values: list) -> pa.Table:
    count = len(values["key"])
    return pa.Table.from_pydict(
        {name: values.get(name, [None] * count) for name in SAMPLE_SOURCE.names}, schema=SAMPLE_SOURCE
    )


def shuffled(rows: pa.Table, seed: int) -> pa.Table:
    """The rows in a seeded random order (sources interleaved)."""
    return rows.take(pa.array(np.random.default_rng(seed).permutation(rows.num_rows)))
