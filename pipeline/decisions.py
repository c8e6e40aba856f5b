"""A person's decisions from `hqsam review` (decisions.json), read, checked against OUT and applied
to the final COCO file (`hqsam apply`, through pipeline/write_coco.py, the one COCO writer).

The file, as the review page exports it:

    {"hqsam_decisions": 1, "out": "<OUT as given to hqsam review>",
     "decisions": [{"ann_index": 5, "annotation_id": 17, "decision": "accept" | "reject"}, ...]}
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import orjson

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError
from hqsam.pipeline.read_refined import read_part_files, refined_parts
from hqsam.pipeline.review_page import DECISIONS_VERSION
from hqsam.pipeline.review_run import recorded_input
from hqsam.pipeline.write_coco import write_coco
from hqsam.schemas.status import Status

CHOICES = {"accept": True, "reject": False}


class DecisionsError(HqsamError, ValueError):
    """The decisions file cannot be applied to this OUT; the message is one sentence (exit code 2)."""


@dataclass
class Decision:
    annotation_id: int
    accept: bool


@dataclass
class Applied:
    uri: str  # the COCO file written
    tally: Counter  # (decided_by, accepted) -> rows; ("status", False): rows that are not ok


def same_out(a: str, b: str) -> bool:
    """Whether two spellings name the same OUT (a local path relative or absolute, a trailing /)."""
    return storage.absolute(a).rstrip("/") == storage.absolute(b).rstrip("/")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_decisions(data: bytes, out: str, name: str = "the decisions file") -> dict[int, Decision]:
    """ann_index -> Decision from a decisions file's bytes, checked to be made for `out`."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise DecisionsError(f"{name} is not JSON; export it again from the review page") from None
    if not isinstance(document, dict) or document.get("hqsam_decisions") != DECISIONS_VERSION:
        raise DecisionsError(
            f'{name} is not a decisions file of hqsam review (no "hqsam_decisions": {DECISIONS_VERSION})'
        )
    made_for = document.get("out")
    if not isinstance(made_for, str) or not same_out(made_for, out):
        raise DecisionsError(
            f"{name} holds decisions for {made_for!r}, not for {out!r}; apply it to the OUT it was "
            "reviewed from"
        )
    entries = document.get("decisions")
    if not isinstance(entries, list):
        raise DecisionsError(f'{name} has no "decisions" list')
    decisions: dict[int, Decision] = {}
    for number, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or not _whole(entry.get("ann_index"))
            or not _whole(entry.get("annotation_id"))
            or entry.get("decision") not in CHOICES
        ):
            raise DecisionsError(
                f"decision #{number} of {name} is not "
                '{"ann_index": int, "annotation_id": int, "decision": "accept" | "reject"}'
            )
        position = entry["ann_index"]
        if position in decisions:
            raise DecisionsError(f"{name} decides annotation #{position} twice")
        decisions[position] = Decision(entry["annotation_id"], CHOICES[entry["decision"]])
    return decisions


def check_against_out(decisions: dict[int, Decision], out: str, name: str = "the decisions file") -> None:
    """Every decision names an ok row of OUT, with the annotation id that row has. Reads only the
    rows decided (a filter on ann_index per part)."""
    if not decisions:
        return
    parts = refined_parts(out)
    if not parts:
        raise DecisionsError(
            f"{storage.redact(out)} holds no rows/part-*.parquet files; is it the --out of `hqsam refine`?"
        )
    positions = sorted(decisions)
    table = read_part_files(
        parts, ["ann_index", "annotation_id", "status"], filters=[("ann_index", "in", positions)]
    )
    rows = {row["ann_index"]: row for row in table.to_pylist()}  # the last of two rows wins, as in write_coco
    for position in positions:
        row = rows.get(position)
        if row is None:
            raise DecisionsError(
                f"{name} decides annotation #{position}, which {storage.redact(out)} has no row for"
            )
        if row["annotation_id"] != decisions[position].annotation_id:
            raise DecisionsError(
                f"{name} names annotation #{position} id {decisions[position].annotation_id}, but "
                f"{storage.redact(out)} has id {row['annotation_id']} there: it was made for another OUT"
            )
        if row["status"] != Status.OK:
            raise DecisionsError(
                f"{name} decides annotation #{position}, whose row in {storage.redact(out)} is "
                f"{row['status']}, not ok: it has no refined mask to decide on"
            )


def _is_parquet(uri: str) -> bool:
    fs, path = storage.url_to_fs(uri)
    try:
        return fs.isdir(path) or fs.cat_file(path, start=0, end=4) == b"PAR1"
    except FileNotFoundError:
        return False


def apply_decisions(
    out: str, decisions_uri: str, *, annotations: str | None = None, to: str | None = None
) -> Applied:
    """Write the final COCO file of `out` (default OUT/annotations.json): refined masks where a
    person accepted, or where nobody decided and the policy accepted; the original elsewhere."""
    name = storage.redact(decisions_uri)
    try:
        data = storage.read_bytes(decisions_uri)
    except FileNotFoundError:
        raise DecisionsError(f"decisions file {name} does not exist") from None
    decisions = parse_decisions(data, out, name)
    annotations = annotations or recorded_input(out)
    if not annotations:
        raise DecisionsError(
            f"{storage.redact(out)} records no input that still exists; pass the run's COCO file with --annotations"
        )
    if not storage.exists(annotations):
        raise DecisionsError(f"annotation file {storage.redact(annotations)} does not exist")
    if _is_parquet(annotations):
        raise DecisionsError(
            f"hqsam apply writes a COCO file from the run's COCO input, and {storage.redact(annotations)} "
            "is a Parquet manifest or task folder; pass the COCO file with --annotations"
        )
    check_against_out(decisions, out, name)
    tally: Counter = Counter()
    verdicts = {position: decision.accept for position, decision in decisions.items()}
    uri = write_coco(annotations, out, decisions=verdicts, to=to, tally=tally)
    return Applied(uri, tally)
