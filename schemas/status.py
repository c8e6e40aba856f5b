"""The status vocabulary: every annotation's row ends with exactly one of these (PENDING only in flight).

This is the only spelling of a status anywhere in the code.
"""

from __future__ import annotations

import enum


class Status(str, enum.Enum):
    PENDING = "pending"  # in flight: refinable, the refine stage turns it into OK or INFERENCE_FAILED
    OK = "ok"
    IMAGE_MISSING = "image_missing"
    IMAGE_UNREADABLE = "image_unreadable"
    IMAGE_SIZE_MISMATCH = "image_size_mismatch"
    INVALID_BOX = "invalid_box"
    CROWD_SKIPPED = "crowd_skipped"
    INFERENCE_FAILED = "inference_failed"
    # The process working on the row's image died, a native crash, the OOM killer or a lost node, on
    # every try Ray allowed it (pipeline/stage.py bounds them), or the Ray run ended before the row
    # was written; pipeline/write_leftovers.py then writes the row with this status and the error.
    WORKER_CRASHED = "worker_crashed"

    def __str__(self) -> str:
        return self.value


# The statuses an output row can have (PENDING never reaches a sink).
FINAL_STATUSES = tuple(status for status in Status if status is not Status.PENDING)
# Not counted as failures by --max-error-rate: crowd regions pass through on purpose.
NOT_FAILURES = frozenset({Status.OK, Status.CROWD_SKIPPED})
