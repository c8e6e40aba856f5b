"""Sink: the input COCO file with refined segmentations, streamed out annotation by annotation.

Memory does not grow with the file: the input is walked with pipeline/json_walk.py (orjson parses
it, so values read exactly as in the file parsed whole), its top-level keys in file order,
`images` and `annotations` a window of items at a time and the other (small) values whole, while
OUT's rows come merged from its parts in input order (pipeline/sorted_rows.py). A file orjson
cannot read but Python's json can (NaN, Infinity, integers beyond 64 bits) or a top-level key
written twice (a parsed dict keeps the last) is read whole instead, as before streaming.

Which mask an annotation gets: the refined one when its row is ok and accepted, by a person's
decision (`hqsam apply --decisions`, ann_index -> accept) or, without one, by the acceptance
policy's verdict (the row's `accepted`; null in an OUT written before the policy, taken as
accepted); otherwise the original, as it was. The decisions are the only thing held besides the
walk and the merge: one dict entry per decision a person made.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import IO

import numpy as np
import orjson

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError, one_line
from hqsam.pipeline import json_walk
from hqsam.pipeline.read_refined import part_files
from hqsam.pipeline.sorted_rows import image_ids, rows_by_position
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
    "accepted",
    "status",
    "error",
    "model",
]
STREAMED = ("images", "annotations")  # the top-level lists written item by item
READ_BLOCK = 2**20


class OutputMismatchError(HqsamError):
    """OUT's rows were not refined from this annotation file."""


class AnnotationFileError(HqsamError):
    """The annotation file is not valid JSON."""


class _Whole(Exception):
    """Streaming cannot give what the file parsed whole gives: write it from the whole file."""


def write_coco(
    annotations_uri: str,
    out: str,
    *,
    only_processed_images: bool = False,
    decisions: Mapping[int, bool] | None = None,
    to: str | None = None,
    tally: Counter | None = None,
) -> str:
    """Write OUT/annotations.json (or `to`) from the input file and OUT's part files; returns its URI.

    Accepted rows (see the module's docstring; `decisions` maps ann_index -> accept, a person's
    word over the policy's) give their annotation the refined RLE, with `area` and `bbox` taken from
    it; the others keep their original segmentation, bbox and area. Every annotation with a row gets
    an `hqsam` object, with `accepted` and `decided_by` ("policy" or "person"). Unknown fields are
    kept. A row goes to the annotation at its position in the file (ids may repeat), which must be
    on the row's image. `tally`, when given, counts the rows by (decided_by, accepted), the rows
    that are not ok as ("status", False).
    """
    parts = part_files(out)
    processed = image_ids(parts) if only_processed_images else None
    name = storage.redact(annotations_uri)
    uri = to or f"{out.rstrip('/')}/annotations.json"
    verdicts = _Verdicts(decisions or {}, tally)
    with storage.atomic_writer(uri) as handle:
        try:
            _write_streamed(handle, annotations_uri, parts, processed, name, verdicts)
        except _Whole:
            handle.seek(0)
            handle.truncate()
            verdicts.reset()
            coco = storage.read_json(annotations_uri)
            _write(handle, coco, _rows(parts), processed, name, verdicts)
    return uri


class _Verdicts:
    """Whether a row's refined mask is taken, and who said so; counted into `tally`."""

    def __init__(self, decisions: Mapping[int, bool], tally: Counter | None) -> None:
        self.decisions, self.tally = decisions, tally
        self.counted: Counter = Counter()

    def of(self, row: dict) -> tuple[bool, str]:
        if row["status"] != Status.OK:
            verdict = (False, "policy")  # nothing refined to take
            self.counted["status", False] += 1
            return verdict
        person = self.decisions.get(row["ann_index"])
        if person is not None:
            verdict = (bool(person), "person")
        else:  # null: an OUT written before the policy existed took every ok row
            verdict = (row.get("accepted") is not False, "policy")
        self.counted[verdict[1], verdict[0]] += 1
        return verdict

    def reset(self) -> None:
        """Forget what a streamed write that is being redone from the whole file counted."""
        self.counted.clear()

    def report(self) -> None:
        if self.tally is not None:
            self.tally.update(self.counted)


def _write_streamed(
    handle: IO[bytes], uri: str, parts: list[str], processed, name: str, verdicts: _Verdicts
) -> None:
    try:
        _write_document(handle, _streamed_members(uri), _rows(parts), processed, name, verdicts)
    except json_walk.NotOrjson:
        raise _Whole from None
    except json_walk.BrokenJson as error:
        raise AnnotationFileError(f"{name} is not valid JSON ({error})") from None


def _rows(parts: list[str]) -> Iterator[dict]:
    return rows_by_position(parts, RESULT_COLUMNS)


def _write(
    handle: IO[bytes],
    coco: dict,
    rows: Iterator[dict],
    processed,
    name: str = "",
    verdicts: _Verdicts | None = None,
) -> None:
    """`coco`, parsed whole, as JSON with the `rows` (in position order) applied."""
    verdicts = verdicts or _Verdicts({}, None)
    _write_document(handle, _whole_members(coco, processed), rows, processed, name, verdicts)


def _whole_members(coco: dict, processed) -> Iterator[tuple[str, object, Iterator | None]]:
    for key, value in coco.items():
        if key == "annotations":
            yield key, None, iter(value or [])
        elif key == "images" and processed is not None:
            yield key, None, iter(value)
        else:
            yield key, value, None


def _streamed_members(uri: str) -> Iterator[tuple[str, object, Iterator | None]]:
    """(key, value, None) per top-level member of the file, in file order; (key, None, items) for
    the lists in STREAMED, whose items must be read before the next member is asked for."""
    fs, path = storage.url_to_fs(uri)
    seen = set()
    with fs.open(path, "rb", block_size=READ_BLOCK) as handle:
        pieces = json_walk.walk(handle)
        for piece in pieces:
            if piece.key is None or piece.key in seen:
                raise _Whole  # a root array, or a key written twice: what the whole file gives
            seen.add(piece.key)
            if piece.kind == "value":
                if piece.key in STREAMED:
                    raise _Whole  # null or an object: what the whole file gives for it
                yield piece.key, piece.value, None
            elif piece.key in STREAMED:
                yield piece.key, None, _array_items(pieces)
            else:
                yield piece.key, list(_array_items(pieces)), None


def _array_items(pieces: Iterator[json_walk.Piece]) -> Iterator:
    """The items of the array just opened in `pieces`, up to its close."""
    for piece in pieces:
        if piece.kind == "close":
            return
        yield from piece.value


def _write_document(
    handle: IO[bytes], members, rows: Iterator[dict], processed, name: str, verdicts: _Verdicts
) -> None:
    """The members as one JSON object, the rows applied to `annotations` (`[]` when absent)."""
    results = _Results(rows, name, verdicts)
    handle.write(b"{")
    separator = b""
    annotations_written = False
    for key, value, items in members:
        handle.write(separator + orjson.dumps(key) + b":")
        separator = b","
        if key == "annotations":
            _write_annotations(handle, items, results, processed)
            annotations_written = True
        elif items is not None:
            _write_images(handle, items, processed)
        else:
            handle.write(_dumps(value, key))
    if not annotations_written:
        handle.write(separator + b'"annotations":')
        _write_annotations(handle, iter(()), results, processed)
    results.finish()
    verdicts.report()
    handle.write(b"}\n")


def _write_annotations(handle: IO[bytes], annotations: Iterator, results: _Results, processed) -> None:
    handle.write(b"[")
    first = True
    for position, annotation in enumerate(annotations):
        row = results.at(position, annotation)
        if row is None and processed is not None:
            continue
        if row is not None:
            _apply(annotation, row, *results.verdicts.of(row))
        handle.write((b"" if first else b",\n") + _dumps_annotation(annotation, position))
        first = False
    handle.write(b"]")


def _write_images(handle: IO[bytes], images: Iterator, processed) -> None:
    handle.write(b"[")
    first = True
    for image in images:
        if processed is None or _has(processed, image.get("id")):
            handle.write((b"" if first else b",") + _dumps(image, "an image record"))
            first = False
    handle.write(b"]")


def _has(ids: np.ndarray, value) -> bool:
    """`value in set(ids)` as Python says it (1.0 and True are 1), on the sorted array `ids`."""
    if not isinstance(value, int | float) or (isinstance(value, float) and not math.isfinite(value)):
        return False
    if value != int(value) or not -(2**63) <= int(value) < 2**63:
        return False
    at = int(np.searchsorted(ids, int(value)))
    return at < len(ids) and int(ids[at]) == int(value)


class _Results:
    """OUT's rows in position order, handed out annotation by annotation."""

    def __init__(self, rows: Iterator[dict], name: str, verdicts: _Verdicts) -> None:
        self.rows, self.name, self.verdicts = rows, name, verdicts
        self.next = next(rows, None)

    def at(self, position: int, annotation) -> dict | None:
        """The row of the annotation at `position`, checked to be on its image. Of two rows at one
        position the last (in part order) wins, as the dict of positions did before streaming."""
        found = None
        while self.next is not None and self.next["ann_index"] <= position:
            row = self.next
            if row["ann_index"] != position or annotation.get("image_id") != row["image_id"]:
                raise self._mismatch(row)
            found = row
            self.next = next(self.rows, None)
        return found

    def finish(self) -> None:
        """Rows beyond the last annotation belong to another file."""
        if self.next is not None:
            raise self._mismatch(self.next)

    def _mismatch(self, row: dict) -> OutputMismatchError:
        return OutputMismatchError(
            f"OUT holds a row for annotation #{row['ann_index']} of image {row['image_id']}, which "
            f"{self.name} does not have: OUT was refined from another annotation file"
        )


def _apply(annotation: dict, row: dict, accepted: bool, decided_by: str) -> None:
    status = row["status"]
    if accepted:
        annotation["segmentation"] = row["segmentation"]
        annotation["area"] = row["area"]
        annotation["bbox"] = row["bbox"]
    annotation["hqsam"] = {
        "score": row["score"],
        "status": status,
        "error": row["error"],
        "iou_vs_original": row["iou_vs_original"],
        "boundary_iou_vs_original": row["boundary_iou_vs_original"],
        "model": row["model"],
        "accepted": accepted,
        "decided_by": decided_by,
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
