"""Sink: the input COCO file with refined segmentations, streamed out annotation by annotation."""

from __future__ import annotations

import json
import logging
from typing import IO

import orjson

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError, one_line
from hqsam.pipeline.read_refined import read_parts
from hqsam.schemas.status import Status

log = logging.getLogger(__name__)

RESULT_COLUMNS = [
    "image_id",
    "ann_index",
    "bbox",
    "area",
    "segmentation",
    "score",
    "iou_vs_original",
    "boundary_iou_vs_original",
    "status",
    "error",
    "model",
]


class OutputMismatchError(HqsamError):
    """OUT's rows were not refined from this annotation file."""


def write_coco(annotations_uri: str, out: str, *, only_processed_images: bool = False) -> str:
    """Write OUT/annotations.json from the input file and OUT's part files; returns its URI.

    Refined annotations get the new RLE, with `area` and `bbox` taken from it, and an `hqsam`
    object; failed ones keep their original segmentation. Unknown fields are kept. A row goes to
    the annotation at its position in the file (ids may repeat), which must be on the row's image.
    """
    results = read_parts(out, RESULT_COLUMNS).to_pydict()
    coco = storage.read_json(annotations_uri)
    _check_positions(results, coco.get("annotations") or [], annotations_uri)
    processed = set(results["image_id"]) if only_processed_images else None
    uri = f"{out.rstrip('/')}/annotations.json"
    with storage.atomic_writer(uri) as handle:
        _write(handle, coco, results, processed)
    return uri


def _write(handle: IO[bytes], coco: dict, results: dict, processed: set | None) -> None:
    """`coco` as JSON with the results applied; only the `processed` images when given."""
    row_at = {position: i for i, position in enumerate(results["ann_index"])}
    handle.write(b"{")
    for key, value in coco.items():
        if key == "annotations":
            continue
        if key == "images" and processed is not None:
            value = [image for image in value if image.get("id") in processed]
        handle.write(orjson.dumps(key) + b":" + _dumps(value, key) + b",")
    handle.write(b'"annotations":[')
    first = True
    for position, annotation in enumerate(coco.get("annotations") or []):
        i = row_at.get(position)
        if i is None and processed is not None:
            continue
        if i is not None:
            _apply(annotation, results, i)
        handle.write((b"" if first else b",\n") + _dumps_annotation(annotation, position))
        first = False
    handle.write(b"]}\n")


def _check_positions(results: dict, annotations: list, uri: str) -> None:
    """Every row's position holds an annotation of the row's image, or OUT is another file's."""
    for position, image_id in zip(results["ann_index"], results["image_id"]):
        if position >= len(annotations) or annotations[position].get("image_id") != image_id:
            raise OutputMismatchError(
                f"OUT holds a row for annotation #{position} of image {image_id}, which "
                f"{storage.redact(uri)} does not have: OUT was refined from another annotation file"
            )


def _apply(annotation: dict, results: dict, i: int) -> None:
    status = results["status"][i]
    if status == Status.OK:
        annotation["segmentation"] = results["segmentation"][i]
        annotation["area"] = results["area"][i]
        annotation["bbox"] = results["bbox"][i]
    annotation["hqsam"] = {
        "score": results["score"][i],
        "status": status,
        "error": results["error"][i],
        "iou_vs_original": results["iou_vs_original"][i],
        "boundary_iou_vs_original": results["boundary_iou_vs_original"][i],
        "model": results["model"][i],
    }


UNWRITABLE = (RecursionError, ValueError, TypeError)  # what the standard json module raises


def _dumps(value, where: str) -> bytes:
    """`value` as JSON, or a null in its place (with a warning) when it cannot be written at all.

    orjson refuses values nested over 254 deep and integers beyond 64 bits, which an input file may
    hold (storage.parse_json reads it with the standard library when orjson cannot): those values
    go through the standard json module, which only a value nested beyond Python's recursion
    limit, or one holding NaN there, defeats."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        pass
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except UNWRITABLE as error:
        log.warning("%s cannot be written as JSON (%s); written as null", where, one_line(error))
        return b"null"


def _dumps_annotation(annotation: dict, position: int) -> bytes:
    """One annotation as JSON; a field that cannot be written at all becomes null, and the
    annotation's `hqsam` object names it, so that one annotation never fails the file."""
    try:
        return orjson.dumps(annotation)
    except orjson.JSONEncodeError:
        pass
    fields = {key: _dumps(value, f"{key!r} of annotation #{position}") for key, value in annotation.items()}
    unwritable = [key for key, text in fields.items() if text == b"null" and annotation[key] is not None]
    if unwritable:
        hqsam = annotation.get("hqsam") if isinstance(annotation.get("hqsam"), dict) else {}
        fields["hqsam"] = orjson.dumps(hqsam | {"unwritable_fields": unwritable})
    return b"{" + b",".join(orjson.dumps(key) + b":" + text for key, text in fields.items()) + b"}"
