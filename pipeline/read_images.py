"""Stage 1 (IO): fetch each image's bytes from storage."""

from __future__ import annotations

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import one_line


def read_image_bytes(row: dict) -> dict:
    """Add `image_bytes`, `image_status` and `image_error`; a missing image marks the row image_missing."""
    row["image_bytes"], row["image_status"], row["image_error"] = b"", "ok", ""
    uri = row["image_uri"]
    if uri is None:
        row["image_status"] = "image_missing"
        row["image_error"] = f"no image record for image_id {row['image_id']}"
        return row
    try:
        row["image_bytes"] = storage.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError):
        row["image_status"], row["image_error"] = "image_missing", f"no file at {uri}"
    except Exception as error:  # after retries: permissions, network; keep the row, report it
        row["image_status"], row["image_error"] = "image_missing", f"cannot read {uri}: {one_line(error)}"
    return row
