"""Stage (CPU): the acceptance policy's verdict on each refined annotation (hqsam_core/acceptance.py)."""

from __future__ import annotations

import numpy as np

from hqsam.hqsam_core.acceptance import AcceptancePolicy
from hqsam.pipeline.stage import Row, Stage
from hqsam.schemas.status import Status

# Each policy column and the row field that holds it.
COLUMN_FIELDS = {
    "score": "scores",
    "stability": "stabilities",
    "sam_hq_iou": "sam_hq_ious",
    "iou_vs_original": "ious",
    "boundary_iou_vs_original": "boundary_ious",
    "area": "areas",
    "category_id": "category_ids",
}


class JudgeRows(Stage):
    """Marks every ok annotation accepted (1) or rejected (0, with the clause that failed)."""

    reads = ("statuses", *dict.fromkeys(COLUMN_FIELDS.values()))
    adds = ("accepted", "rejected_by")

    def __init__(self, policy: str) -> None:
        self.policy = AcceptancePolicy.parse(policy)

    def process(self, rows: list[Row]) -> list[Row]:
        for row in rows:
            count = len(row["statuses"])
            row["accepted"] = np.full(count, -1, np.int8)
            row["rejected_by"] = [""] * count
            ok = np.flatnonzero([status == Status.OK for status in row["statuses"]])
            if not len(ok):
                continue
            columns = {
                name: np.asarray(row[field], np.float64)[ok]
                for name, field in COLUMN_FIELDS.items()
                if name in self.policy.columns
            }
            accepted, rejected_by = self.policy.judge(columns)
            row["accepted"][ok] = accepted
            for k, clause in zip(ok, rejected_by):
                row["rejected_by"][k] = clause or ""
        return rows
