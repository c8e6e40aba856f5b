"""The accounting of a refine run: every annotation counted from what OUT holds (OUT/summary.json),
the exit code, and the summary's lines for a terminal."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.version import versions
from hqsam.pipeline.out_tally import OutTally
from hqsam.pipeline.read_refined import ROWS_FOLDER
from hqsam.pipeline.stream_coco import StreamedManifest
from hqsam.schemas.status import NOT_FAILURES, Status

if TYPE_CHECKING:  # refine_run imports this module
    from hqsam.pipeline.refine_run import RefineConfig

URI_SETTINGS = ("checkpoint", "hq_head")  # recorded redacted: a signed URL carries its secret


def account(
    config: RefineConfig,
    tasks: StreamedManifest,
    before: OutTally,
    after: OutTally,
    elapsed: float,
    checkpoint_sha256: str,
) -> dict:
    """The run's summary: every annotation of `tasks` counted from what OUT holds at the end
    (`after`, pipeline/out_tally.py); `before` is what it lacked at the start (what this run
    refined), `checkpoint_sha256` the weights' hash from the run's identity ("random" for random
    weights)."""
    annotations_total = tasks.annotations
    failed = sum(n for status, n in after.statuses.items() if status not in NOT_FAILURES)
    settings = config.settings
    return {
        "annotations_total": annotations_total,
        "annotations_written": after.written,
        "annotations_ok": after.statuses.get(Status.OK, 0),
        "errors": {status: n for status, n in sorted(after.statuses.items()) if status != Status.OK},
        "error_rate": failed / annotations_total if annotations_total else 0.0,
        "max_error_rate": config.max_error_rate,
        "acceptance": {
            "policy": settings.accept,
            "accepted": after.accepted,
            "rejected": after.rejected,
            # the clause that rejects most first: what a user looks at
            "rejected_by_clause": dict(
                sorted(after.rejected_by_clause.items(), key=lambda kv: (-kv[1], kv[0]))
            ),
            "by_category": dict(sorted(after.by_category.items(), key=lambda kv: _category_order(kv[0]))),
        },
        "annotations_written_twice": after.repeated,
        "duplicate_annotation_ids": tasks.duplicate_annotation_ids,
        "images_total": tasks.images,
        "images_resumed": tasks.images - before.unwritten_images,
        "wall_time_s": round(elapsed, 3),
        "annotations_per_s": round(before.unwritten_annotations / elapsed, 3) if elapsed else None,
        "images_per_s": round(before.unwritten_images / elapsed, 3) if elapsed else None,
        "model": settings.model_column,
        "versions": versions(),
        "checkpoint": storage.redact(settings.checkpoint),
        "checkpoint_sha256": checkpoint_sha256,
        "hq_head": storage.redact(settings.hq_head),
        "format": config.format,
        "out": storage.redact(config.out),
        "settings": dataclasses.asdict(settings)
        | {key: storage.redact(getattr(settings, key)) for key in URI_SETTINGS},
        "complete": after.written == annotations_total and not after.repeated,
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
        *_acceptance_lines(summary.get("acceptance")),
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


def _acceptance_lines(acceptance: dict | None) -> list[tuple[str, str]]:
    """The policy's verdicts: how many refined masks replace their originals, and why not."""
    if not acceptance or not acceptance["accepted"] + acceptance["rejected"]:
        return []
    lines = [
        ("accepted", f"{acceptance['accepted']} (policy: {acceptance['policy']})"),
        ("rejected", f"{acceptance['rejected']} (the original mask is kept)"),
    ]
    return lines + [(f"  by {clause}", str(n)) for clause, n in acceptance["rejected_by_clause"].items()]


def _category_order(key: str) -> tuple[int, float | str]:
    """Category ids in numeric order, anything else after them."""
    try:
        return 0, float(key)
    except ValueError:
        return 1, key


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
