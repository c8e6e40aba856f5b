"""Source: turn a COCO instances file or a Parquet manifest into per-image task rows.

The annotation file is the manifest: images are never found by listing buckets.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from schemas.manifest import IMAGE_TASK


class ManifestError(ValueError):
    """The annotation file cannot be used; the message is one sentence."""


@dataclass
class Manifest:
    tasks: pa.Table  # schemas.manifest.IMAGE_TASK, one row per image with annotations
    annotations_total: int


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
    return Manifest(tasks=tasks, annotations_total=sum(len(ids) for ids in tasks["ann_ids"].to_pylist()))


def _tasks_from_coco(data: bytes, root: str, uri: str) -> pa.Table:
    try:
        coco = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise ManifestError(f"{uri} is neither Parquet nor valid JSON ({error})") from None
    del data
    if not isinstance(coco, dict) or not isinstance(coco.get("annotations"), list):
        raise ManifestError(f"{uri} is not a COCO instances file: it has no 'annotations' list")
    images = {image["id"]: image for image in coco.get("images") or []}
    groups: dict[int, list[dict]] = {image_id: [] for image_id in images}
    for position, annotation in enumerate(coco["annotations"]):
        if "id" not in annotation or "image_id" not in annotation:
            raise ManifestError(f"annotation #{position} in {uri} lacks an 'id' or 'image_id'")
        groups.setdefault(annotation["image_id"], []).append(annotation)
    del coco

    columns = _columns()
    for image_id, group in groups.items():
        image = images.get(image_id)
        if image is None:
            _add_task(columns, image_id, None, None, None, group, _json)
        else:
            uri = storage.join(root, image["file_name"])
            _add_task(columns, image_id, uri, image.get("width"), image.get("height"), group, _json)
    return pa.Table.from_pydict(columns, schema=IMAGE_TASK)


def _tasks_from_parquet(table: pa.Table, root: str, uri: str) -> pa.Table:
    missing = {"image_id", "image_uri", "annotations"} - set(table.column_names)
    if missing:
        raise ManifestError(f"{uri} is not an hqsam Parquet manifest: columns {sorted(missing)} are missing")
    columns = _columns()
    for row in table.to_pylist():
        uri = storage.join(root, row["image_uri"])
        annotations = row["annotations"] or []
        _add_task(columns, row["image_id"], uri, row.get("width"), row.get("height"), annotations, _text)
    return pa.Table.from_pydict(columns, schema=IMAGE_TASK)


def _columns() -> dict[str, list]:
    return {field.name: [] for field in IMAGE_TASK}


def _add_task(columns, image_id, uri, width, height, annotations: list[dict], segmentation_text) -> None:
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
    columns["segmentations"].append([segmentation_text(a.get("segmentation")) for a in annotations])


def _box(value) -> list[float]:
    if not isinstance(value, list | tuple) or len(value) != 4:
        return []
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return []


def _json(segmentation) -> str:
    return orjson.dumps(segmentation).decode() if segmentation else ""


def _text(segmentation: str | None) -> str:
    return segmentation or ""
