"""The `hqsam review` run: a static review site for a refine output, written to a folder (local or
object storage): index.html (pipeline/review_page.py) and crops/<ann_index>_{original,refined}.jpg
beside it (pipeline/review_crops.py).

Only OUT's small columns are read for every row (the charts and the order need them); the refined
masks and image URIs are read for the queue's rows only, and images are decoded one at a time.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import one_line
from hqsam.pipeline import json_walk
from hqsam.pipeline.progress import ProgressReporter
from hqsam.pipeline.read_refined import ROWS_FOLDER, read_part_files, refined_parts
from hqsam.pipeline.review_crops import (
    Original,
    ReviewError,
    image_candidates,
    jpeg,
    mask_size,
    read_image,
    read_originals,
    row_crops,
)
from hqsam.pipeline.review_page import (
    QUALITY_COLUMNS,
    category_label,
    histograms,
    page_data,
    page_html,
    rejected,
    review_order,
)
from hqsam.schemas.status import Status

log = logging.getLogger(__name__)

RUN_RECORD = "_hqsam_run.json"  # pipeline/run_identity.py's name: importing it would load torch
CROPS = "crops"
SMALL_COLUMNS = [
    "image_id",
    "annotation_id",
    "ann_index",
    "category_id",
    "status",
    *QUALITY_COLUMNS,
    "prompt",
    "accepted",
    "rejected_by",
]


@dataclass
class ReviewResult:
    index: str  # URI of index.html
    queued: int  # rows in the queue (with crops)
    skipped: list[dict]  # rows chosen but not shown: ann_index, annotation_id, image_id, note
    rows_total: int


def recorded_input(out: str) -> str | None:
    """The input OUT's run recorded (OUT/_hqsam_run.json), when it names one that still exists."""
    try:
        identity = storage.read_json(storage.join(out.rstrip("/"), RUN_RECORD)).get("identity") or {}
    except (OSError, ValueError, AttributeError):
        return None
    uri = identity.get("annotations_uri") if isinstance(identity, dict) else None
    # a redacted URI (secrets replaced by ***) cannot be read back
    if not isinstance(uri, str) or "***" in uri or not storage.exists(uri):
        return None
    return uri


def category_names(annotations: str | None) -> dict[int, str]:
    """id -> name of a COCO file's `categories` ({} for a Parquet manifest or an unusable file),
    found by walking the file in bounded memory."""
    if not annotations:
        return {}
    fs, path = storage.url_to_fs(annotations)
    names = {}
    try:
        with fs.open(path, "rb") as handle:
            if handle.read(4) == b"PAR1":
                return {}
            handle.seek(0)
            for piece in json_walk.walk(handle):
                if piece.key == "categories" and piece.kind == "value":
                    for category in piece.value if isinstance(piece.value, list) else []:
                        if isinstance(category, dict) and isinstance(category.get("id"), int):
                            names[category["id"]] = str(category.get("name", ""))
                elif piece.key == "categories" and piece.kind == "items":
                    for category in piece.value:
                        if isinstance(category, dict) and isinstance(category.get("id"), int):
                            names[category["id"]] = str(category.get("name", ""))
    except (OSError, ValueError, json_walk.BrokenJson, json_walk.NotOrjson) as error:
        log.warning("category names not read from %s (%s)", storage.redact(annotations), one_line(error))
    return names


def _ok_table(parts: list[str]) -> tuple[pa.Table, dict[str, int]]:
    """The small columns of OUT's ok rows, with the part each came from; and the count per status."""
    tables = []
    statuses: Counter = Counter()
    for number, uri in enumerate(parts):
        table = read_part_files([uri], SMALL_COLUMNS)
        statuses.update(table["status"].to_pylist())
        table = table.filter(pc.equal(table["status"], Status.OK))
        tables.append(table.append_column("part", pa.array(np.full(table.num_rows, number, np.int32))))
    return pa.concat_tables(tables), dict(sorted(statuses.items()))


def _attach_masks(parts: list[str], rows: list[dict]) -> None:
    """Read the refined RLE, bbox and image URI of `rows` only (a run's segmentation column is large)."""
    wanted: dict[int, list[dict]] = {}
    for row in rows:
        wanted.setdefault(row["part"], []).append(row)
    for number, chosen in wanted.items():
        positions = sorted({row["ann_index"] for row in chosen})
        table = read_part_files(
            [parts[number]],
            ["ann_index", "image_uri", "segmentation"],
            filters=[("ann_index", "in", positions)],
        )
        found = {found["ann_index"]: found for found in table.to_pylist()}
        for row in chosen:
            match = found.get(row["ann_index"]) or {}
            row["image_uri"] = match.get("image_uri")
            row["segmentation"] = match.get("segmentation")


def _summary(ok: pa.Table, statuses: dict[str, int], originals: bool) -> dict:
    verdicts = ok["accepted"]
    accepted = int(pc.sum(pc.fill_null(verdicts, False).cast(pa.int64())).as_py() or 0)
    refused = int(rejected(ok).sum())
    return {
        "rows": sum(statuses.values()),
        "statuses": statuses,
        "ok": ok.num_rows,
        "policy": {"accepted": accepted, "rejected": refused, "none": ok.num_rows - accepted - refused},
        "originals": originals,
    }


def _page_row(row: dict, names: dict[int, str]) -> dict:
    return {
        "ann_index": row["ann_index"],
        "annotation_id": row["annotation_id"],
        "image_id": row["image_id"],
        "category_id": row["category_id"],
        "category": category_label(row["category_id"], names),
        "values": {column: _finite(row[column]) for column in QUALITY_COLUMNS},
        "accepted": row["accepted"],
        "rejected_by": row["rejected_by"],
        "prompt": row["prompt"],
    }


def _finite(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 4)


def run_review(
    out: str,
    to: str,
    *,
    images: str | None = None,
    annotations: str | None = None,
    n: int = 100,
    progress: bool = True,
) -> ReviewResult:
    """Write the review site of `out` into `to`: the `n` ok rows most in need of a look (in
    review_page.review_order), each with its crops, and the quality charts of all ok rows.
    `annotations` (the run's input) gives the original masks; without it the run's recorded input
    is used when it still exists, else rows show the refined mask only."""
    parts = refined_parts(out)
    if not parts:
        raise ReviewError(
            f"{storage.redact(out)} holds no {ROWS_FOLDER}/part-*.parquet files; is it the --out of "
            "`hqsam refine`?"
        )
    ok, statuses = _ok_table(parts)
    annotations = annotations or recorded_input(out)
    if annotations and not storage.exists(annotations):
        raise ReviewError(f"annotation file {storage.redact(annotations)} does not exist")
    chosen = ok.take(review_order(ok)[:n]).to_pylist()
    _attach_masks(parts, chosen)
    originals = None
    if annotations:
        wanted = {row["ann_index"]: row["image_id"] for row in chosen}
        originals = read_originals(annotations, images, wanted)
    names = category_names(annotations)

    queue, skipped = [], []
    by_image: dict[tuple, list[int]] = {}  # each image is decoded once, then let go
    for k, row in enumerate(chosen):
        original = originals.get(row["ann_index"]) if originals is not None else None
        key = tuple(image_candidates(row["image_uri"] or "", images, original))
        by_image.setdefault(key, []).append(k)
    drawn: dict[int, tuple[list[str | None], str | None]] = {}
    with ProgressReporter(
        "review", total=len(chosen), unit="rows", counters=("skipped",), enabled=progress
    ) as bar:
        for candidates, members in by_image.items():
            image, failure = None, None
            try:
                image = read_image(list(candidates), mask_size(chosen[members[0]]))
            except (OSError, ValueError) as error:
                failure = one_line(error) if not isinstance(error, FileNotFoundError) else str(error)
            for k in members:
                drawn[k] = _draw(chosen[k], image, failure, originals, to)
                bar.advance(1, skipped=int(drawn[k][0][1] is None))
    for k, row in enumerate(chosen):
        crops, note = drawn[k]
        entry = _page_row(row, names)
        if crops[1] is None:
            skipped.append(
                {key: entry[key] for key in ("ann_index", "annotation_id", "image_id")} | {"note": note}
            )
        else:
            queue.append(entry | {"crops": crops, "note": note})
    data = page_data(out, uuid.uuid4().hex, queue, skipped, _summary(ok, statuses, originals is not None))
    index = storage.join(to, "index.html")
    storage.write_bytes(index, page_html(data, histograms(ok, names)).encode())
    return ReviewResult(index=index, queued=len(queue), skipped=skipped, rows_total=data["summary"]["rows"])


def _draw(
    row: dict, image: np.ndarray | None, failure: str | None, originals: dict[int, Original] | None, to: str
) -> tuple[list[str | None], str | None]:
    """Write the row's crops into `to`/crops/; their names relative to `to` ([None, None] when the
    row cannot be drawn) and a note."""
    if image is None:
        return [None, None], failure
    original = originals.get(row["ann_index"]) if originals is not None else None
    missing = "annotation not found in --annotations" if originals is not None and original is None else None
    try:
        panels, note = row_crops(row, image, original)
    except (OSError, ValueError) as error:
        return [None, None], one_line(error)
    names: list[str | None] = []
    for panel, kind in zip(panels, ("original", "refined")):
        if panel is None:
            names.append(None)
            continue
        name = f"{CROPS}/{row['ann_index']}_{kind}.jpg"
        storage.write_bytes(storage.join(to, name), jpeg(panel))
        names.append(name)
    return names, missing or note
