"""Stage (IO): fetch each image's bytes from storage."""

from __future__ import annotations

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import one_line
from hqsam.pipeline.stage import Row, Stage
from hqsam.schemas.status import Status


class ReadImages(Stage):
    """Adds the image's bytes; an image without a record or a file marks the row image_missing."""

    reads = ("image_id", "image_uri")
    adds = ("image_bytes", "image_status", "image_error")

    def process(self, rows: list[Row]) -> list[Row]:
        for row in rows:
            row["image_bytes"], row["image_status"], row["image_error"] = _read(
                row["image_id"], row["image_uri"]
            )
        return rows


def _read(image_id: int, uri: str | None) -> tuple[bytes, Status, str]:
    if uri is None:
        return b"", Status.IMAGE_MISSING, f"no image record with a file name for image_id {image_id}"
    try:
        return storage.read_bytes(uri), Status.OK, ""
    except (FileNotFoundError, IsADirectoryError):
        return b"", Status.IMAGE_MISSING, f"no file at {storage.redact(uri)}"
    except Exception as error:  # after retries: permissions, network; keep the row, report it
        return b"", Status.IMAGE_MISSING, f"cannot read {storage.redact(uri)}: {one_line(error)}"
