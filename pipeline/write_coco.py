"""Sink: the input COCO file with refined segmentations, streamed out annotation by annotation."""

from __future__ import annotations

from typing import IO

import orjson

from hqsam.hqsam_core import storage
from hqsam.pipeline.read_refined import read_parts
from hqsam.schemas.status import Status

RESULT_COLUMNS = [
    "image_id",
    "annotation_id",
    "bbox",
    "area",
    "segmentation",
    "score",
    "iou_vs_original",
    "status",
    "error",
]


def write_coco(annotations_uri: str, out: str, *, only_processed_images: bool = False) -> str:
    """Write OUT/annotations.json from the input file and OUT's part files; returns its URI.

    Refined annotations get the new RLE, with `area` and `bbox` taken from it, and an `hqsam`
    object; failed ones keep their original segmentation. Unknown fields are kept.
    """
    results = read_parts(out, RESULT_COLUMNS).to_pydict()
    coco = storage.read_json(annotations_uri)
    processed = set(results["image_id"]) if only_processed_images else None
    uri = f"{out.rstrip('/')}/annotations.json"
    with storage.atomic_writer(uri) as handle:
        _write(handle, coco, results, processed)
    return uri


def _write(handle: IO[bytes], coco: dict, results: dict, processed: set | None) -> None:
    """`coco` as JSON with the results applied; only the `processed` images when given."""
    position = {annotation_id: i for i, annotation_id in enumerate(results["annotation_id"])}
    handle.write(b"{")
    for key, value in coco.items():
        if key == "annotations":
            continue
        if key == "images" and processed is not None:
            value = [image for image in value if image.get("id") in processed]
        handle.write(orjson.dumps(key) + b":" + orjson.dumps(value) + b",")
    handle.write(b'"annotations":[')
    first = True
    for annotation in coco.get("annotations") or []:
        i = position.get(annotation.get("id"))
        if i is None and processed is not None:
            continue
        if i is not None:
            _apply(annotation, results, i)
        handle.write((b"" if first else b",\n") + orjson.dumps(annotation))
        first = False
    handle.write(b"]}\n")


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
    }
