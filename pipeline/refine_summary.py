"""The accounting of a refine run: every annotation counted from what OUT holds (OUT/summary.json),
the exit code, and the summary's lines for a terminal."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.version import versions
from hqsam.pipeline.manifest import annotation_count, duplicate_annotation_ids, image_count
from hqsam.pipeline.read_refined import ROWS_FOLDER, read_parts
from hqsam.schemas.status import NOT_FAILURES, Status

if TYPE_CHECKING:  # refine_run imports this module
    from hqsam.pipeline.refine_run import RefineConfig

URI_SETTINGS = ("checkpoint", "hq_head")  # recorded redacted: a signed URL carries its secret


def written_rows(tasks: pa.Table, out: str) -> tuple[pa.Table, int]:
    """OUT's rows (ann_index, status) of the annotations of `tasks`, one per annotation, and how
    many rows beyond that one OUT holds (none unless parts were copied in from elsewhere)."""
    rows = read_parts(out, ["ann_index", "status"])
    rows = rows.filter(pc.is_in(rows["ann_index"], value_set=pc.list_flatten(tasks["ann_indices"])))
    _, first = np.unique(rows["ann_index"].to_numpy(), return_index=True)
    return rows.take(first), rows.num_rows - len(first)


def account(
    config: RefineConfig, tasks: pa.Table, refined: pa.Table, elapsed: float, checkpoint_sha256: str
) -> dict:
    """The run's summary: every annotation of `tasks` counted from what OUT holds; `refined` are the
    tasks this run refined, `checkpoint_sha256` the weights' hash from the run's identity ("random"
    for random weights)."""
    annotations_total = annotation_count(tasks)
    written, repeated = written_rows(tasks, config.out)
    images, images_refined = image_count(tasks), image_count(refined)
    counts = Counter(written["status"].to_pylist())
    failed = sum(n for status, n in counts.items() if status not in NOT_FAILURES)
    settings = config.settings
    return {
        "annotations_total": annotations_total,
        "annotations_written": written.num_rows,
        "annotations_ok": counts.get(Status.OK, 0),
        "errors": {status: n for status, n in sorted(counts.items()) if status != Status.OK},
        "error_rate": failed / annotations_total if annotations_total else 0.0,
        "max_error_rate": config.max_error_rate,
        "annotations_written_twice": repeated,
        "duplicate_annotation_ids": duplicate_annotation_ids(tasks),
        "images_total": images,
        "images_resumed": images - images_refined,
        "wall_time_s": round(elapsed, 3),
        "annotations_per_s": round(annotation_count(refined) / elapsed, 3) if elapsed else None,
        "images_per_s": round(images_refined / elapsed, 3) if elapsed else None,
        "model": settings.model_column,
        "versions": versions(),
        "checkpoint": storage.redact(settings.checkpoint),
        "checkpoint_sha256": checkpoint_sha256,
        "hq_head": storage.redact(settings.hq_head),
        "format": config.format,
        "out": storage.redact(config.out),
        "settings": dataclasses.asdict(settings)
        | {key: storage.redact(getattr(settings, key)) for key in URI_SETTINGS},
        "complete": written.num_rows == annotations_total and not repeated,
    }


def exit_code(summary: dict) -> int:
    """0 when every annotation was written and the failure share is within --max-error-rate."""
    return 0 if summary["complete"] and summary["error_rate"] <= summary["max_error_rate"] else 1


def summary_lines(summary: dict) -> list[str]:
    """The summary as aligned `label  value` lines for a terminal."""
    rows = [
        ("annotations", summary["annotations_total"]),
        ("refined ok", summary["annotations_ok"]),
        *((f"  {status}", n) for status, n in summary["errors"].items()),
        ("images", summary["images_total"]),
        ("images resumed", summary["images_resumed"]),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("throughput", f"{summary['annotations_per_s']} ann/s, {summary['images_per_s']} img/s"),
        ("error rate", f"{summary['error_rate']:.4f} (max {summary['max_error_rate']})"),
        *_integrity_lines(summary),
        ("rows", f"{summary['out'].rstrip('/')}/{ROWS_FOLDER}/"),
        ("summary", f"{summary['out'].rstrip('/')}/summary.json"),
    ]
    width = max(len(label) for label, _ in rows)
    return [f"{label:<{width}}  {value}" for label, value in rows]


def _integrity_lines(summary: dict) -> list[tuple[str, str]]:
    """Lines for repeated annotation ids in the input and for annotations written twice, if any."""
    lines = []
    duplicates = summary.get("duplicate_annotation_ids") or {}
    if duplicates.get("ids"):
        examples = ", ".join(map(str, duplicates["examples"]))
        lines.append(
            (
                "duplicate ids",
                f"{duplicates['ids']} annotation ids are shared by {duplicates['annotations']} "
                f"annotations (e.g. {examples}); each annotation was matched by its position",
            )
        )
    if summary.get("annotations_written_twice"):
        lines.append(
            ("written twice", f"{summary['annotations_written_twice']} annotations have more than one row")
        )
    return lines
