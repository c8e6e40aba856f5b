"""Training and evaluation data: sources -> light sample rows -> decoded (image, mask) samples.

A source is one of
- an image + gt folder pair in the HQSeg-44K layout: `SRC/im/*.jpg|jpeg|png` and `SRC/gt/*.png`
  matched by file stem, one object per gt;
- a COCO instances JSON: one sample per non-crowd instance with a segmentation; images relative to
  the file's folder or to `::images=ROOT`;
- a Parquet output of `hqsam refine` (its OUT folder, or one part file): rows with status ok whose
  score is at least `min_score`;
each local or on object storage, optionally `SRC::weight=W` (an epoch holds each of its samples W
times; a fractional part picks that share of them at random) and `SRC::original=URI` (the data's
original annotation, compared with the GT by `hqsam evaluate`: a folder of PNGs by stem for a folder
pair, a COCO file with the same annotation ids for a COCO source).

Listing and parsing happen once on the driver and give light rows (URIs and annotation text, no
pixels); `load_sample` turns one row into pixels wherever it runs (a Ray Data task, an evaluator).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import zlib
from dataclasses import dataclass, field

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError
from hqsam.hqsam_core.images import decode_image
from hqsam.hqsam_core.masks import decode_rle, segmentation_to_mask
from hqsam.pipeline.manifest import ManifestError, read_manifest

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
KINDS = ("folders", "coco", "refined")

SAMPLE_ROW = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # the source's display name
        pa.field("key", pa.string(), nullable=False),  # unique per sample (and per weighted copy)
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("mask_uri", pa.string()),  # folder pairs: the gt PNG
        pa.field("segmentation", pa.string()),  # COCO segmentation or RLE as JSON text
        pa.field("original_uri", pa.string()),
        pa.field("original_segmentation", pa.string()),
        pa.field("height", pa.int64()),  # the image record's size, when the source has one
        pa.field("width", pa.int64()),
        pa.field("image_id", pa.int64()),  # COCO / refined sources: ids for COCO evaluation
        pa.field("annotation_id", pa.int64()),
        pa.field("category_id", pa.int64()),
    ]
)


class SourceError(HqsamError, ValueError):
    """A data source that cannot be used; the message is one sentence."""


class SampleError(HqsamError, ValueError):
    """One sample that cannot be loaded (unreadable image, empty or mismatched mask)."""


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
    if fs.glob(f"{path.rstrip('/')}/part-*.parquet"):
        return "refined"
    raise SourceError(
        f"data source {uri} is a folder with neither im/ + gt/ subfolders nor part-*.parquet files of `hqsam refine`"
    )


def source_rows(source: Source, *, min_score: float | None = None) -> pa.Table:
    """The light sample rows of one source, weight not applied (SAMPLE_ROW schema)."""
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
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    found: dict[str, str] = {}
    for name in sorted(fs.ls(path, detail=False)):
        base = posixpath.basename(name.rstrip("/"))
        stem, suffix = posixpath.splitext(base)
        if suffix.lower() not in suffixes or base.startswith("."):
            continue
        if stem in found:
            raise SourceError(f"{uri} holds two files with the stem {stem!r}")
        found[stem] = name if storage.is_local(fs) else f"{protocol}://{name}"
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
    columns: dict[str, list] = {name: [] for name in SAMPLE_ROW.names}
    for task in tasks.to_pylist():
        if task["image_uri"] is None:
            continue
        for k, annotation_id in enumerate(task["ann_ids"]):
            if task["iscrowd"][k] or not task["segmentations"][k]:
                continue
            _append(
                columns,
                source=source.name,
                key=f"{source.name}#{annotation_id}",
                image_uri=task["image_uri"],
                segmentation=task["segmentations"][k],
                original_segmentation=originals.get(annotation_id),
                height=task["height"],
                width=task["width"],
                image_id=task["image_id"],
                annotation_id=annotation_id,
                category_id=task["category_ids"][k],
            )
    return pa.Table.from_pydict(columns, schema=SAMPLE_ROW)


def _coco_segmentations(uri: str) -> dict[int, str]:
    try:
        coco = json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, ValueError) as error:
        raise SourceError(f"original annotations {uri} are not a readable COCO file ({error})") from None
    return {
        a["id"]: orjson.dumps(a["segmentation"]).decode()
        for a in coco.get("annotations", [])
        if a.get("segmentation")
    }


def _refined_rows(source: Source, min_score: float | None) -> pa.Table:
    from hqsam.pipeline.read_refined import read_parts

    columns = ["image_id", "image_uri", "annotation_id", "category_id", "segmentation", "score", "status"]
    if source.uri.lower().endswith(".parquet"):
        fs, path = storage.url_to_fs(source.uri)
        table = pq.read_table(path, columns=columns, filesystem=fs)
    else:
        table = read_parts(source.uri, columns)
    keep = pc.equal(table["status"], "ok")
    if min_score is not None:
        keep = pc.and_(keep, pc.greater_equal(pc.fill_null(table["score"], -1.0), min_score))
    rows = table.filter(keep).to_pylist()
    return _table(
        source=[source.name] * len(rows),
        key=[f"{source.name}#{r['annotation_id']}" for r in rows],
        image_uri=[r["image_uri"] for r in rows],
        segmentation=[orjson.dumps(r["segmentation"]).decode() for r in rows],
        height=[r["segmentation"]["size"][0] for r in rows],
        width=[r["segmentation"]["size"][1] for r in rows],
        image_id=[r["image_id"] for r in rows],
        annotation_id=[r["annotation_id"] for r in rows],
        category_id=[r["category_id"] for r in rows],
    )


def _append(columns: dict[str, list], **values) -> None:
    for name in SAMPLE_ROW.names:
        columns[name].append(values.get(name))


def _table(**values: list) -> pa.Table:
    count = len(values["key"])
    return pa.Table.from_pydict(
        {name: values.get(name, [None] * count) for name in SAMPLE_ROW.names}, schema=SAMPLE_ROW
    )


# --- loading pixels -------------------------------------------------------------------------


def gt_to_mask(image: Image.Image) -> np.ndarray:
    """A gt PNG -> bool foreground.

    Palette (label) images: every index but 0 and 255 (VOC's "void" band) is foreground, or index
    255 when it is the only one. Gray or RGB images: value > 128 when the image uses values above
    128 (0/255 masks, anti-aliased masks; the official protocol's `gt > 128`), else any nonzero.
    """
    if image.mode == "P":
        values = np.asarray(image)
        labels = (values != 0) & (values != 255)
        return labels if labels.any() else values == 255
    if image.mode not in ("L", "1", "I", "I;16", "F"):
        image = image.convert("L")
    values = np.asarray(image)
    return values > 128 if values.max(initial=0) > 128 else values > 0


def _read_png_mask(uri: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
            image.load()
            return gt_to_mask(image)
    except FileNotFoundError:
        raise SampleError(f"no file at {uri}") from None
    except Exception as error:
        raise SampleError(f"{uri} is not a readable mask PNG ({error})") from None


def _decode_segmentation(text: str, height: int, width: int) -> np.ndarray:
    try:
        value = orjson.loads(text)
        if isinstance(value, dict) and "counts" in value and list(value.get("size", [])) == [height, width]:
            return decode_rle(value)
        return segmentation_to_mask(value, height, width)
    except (ValueError, TypeError, orjson.JSONDecodeError) as error:
        raise SampleError(f"unusable segmentation ({error})") from None


def load_sample(row: dict) -> dict:
    """Read one sample row's image and masks: {image (H,W,3) uint8, mask (H,W) bool, original
    (H,W) bool or None, plus the row's ids}. Raises SampleError for an unusable sample."""
    uri = row["image_uri"]
    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError):
        raise SampleError(f"no image at {uri}") from None
    except Exception as error:
        raise SampleError(f"cannot read {uri} ({error})") from None
    recorded = (row.get("height"), row.get("width"))
    known = all(v is not None and v > 0 for v in recorded)
    try:
        image = decode_image(data, recorded if known else None)
    except ValueError as error:
        raise SampleError(f"{uri}: {error}") from None
    height, width = image.shape[:2]
    mask = _mask(row, "mask_uri", "segmentation", height, width)
    if mask is None:
        raise SampleError(f"{row['key']} has no mask")
    if mask.shape != (height, width):
        raise SampleError(f"{row['key']}: mask is {mask.shape[1]}x{mask.shape[0]}, image {width}x{height}")
    if not mask.any():
        raise SampleError(f"{row['key']}: the mask is empty")
    original = _mask(row, "original_uri", "original_segmentation", height, width)
    if original is not None and original.shape != (height, width):
        raise SampleError(f"{row['key']}: original mask size differs from the image")
    return {
        "image": image,
        "mask": mask,
        "original": original,
        **{k: row.get(k) for k in ("source", "key", "image_id", "annotation_id", "category_id")},
    }


def _mask(row: dict, uri_column: str, text_column: str, height: int, width: int) -> np.ndarray | None:
    if row.get(uri_column):
        return _read_png_mask(row[uri_column])
    if row.get(text_column):
        return _decode_segmentation(row[text_column], height, width)
    return None


def load_sample_rows(row: dict) -> list[dict]:
    """Ray Data flat_map: one decoded training row, or none (with a warning) for a bad sample."""
    try:
        sample = load_sample(row)
    except SampleError as error:
        log.warning("skipping sample %s: %s", row.get("key"), error)
        return []
    return [
        {
            "source": sample["source"],
            "key": sample["key"],
            "image": sample["image"],
            "mask": sample["mask"].astype(np.uint8),  # Arrow tensors of bool are not portable
        }
    ]


def sample_seed(seed: int, epoch: int, key: str) -> list[int]:
    """Per-sample, per-epoch RNG seed: augmentation independent of order and thread."""
    return [seed, epoch, zlib.crc32(key.encode())]


def shuffled(rows: pa.Table, seed: int) -> pa.Table:
    """The rows in a seeded random order (sources interleaved)."""
    return rows.take(pa.array(np.random.default_rng(seed).permutation(rows.num_rows)))


def build_dataset(rows: pa.Table, *, rows_per_block: int = 8, shuffle_blocks: bool = True):
    """A lazy Ray dataset of decoded samples {source, key, image, mask}.

    Only the light rows live on the driver; each block of `rows_per_block` rows is read and decoded
    by a Ray task wherever it runs. With `shuffle_blocks` every epoch visits the blocks in a new order.
    """
    import ray

    blocks = [rows.slice(start, rows_per_block) for start in range(0, rows.num_rows, rows_per_block)]
    dataset = ray.data.from_arrow(blocks or [rows])
    if shuffle_blocks:
        dataset = dataset.randomize_block_order()
    return dataset.flat_map(load_sample_rows)
