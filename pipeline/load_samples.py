"""Sample source rows -> decoded samples: `load_sample` (one row, for the evaluator) and the
`LoadSamples` stage (the training data chain, under Ray Data or locally).

The rows are declared in `schemas/train_rows.py`. An image decodes at the size its record gives
(`hqsam_core.images.decode_at_recorded_size`); a mask comes from a PNG (folder pairs) or from COCO
segmentation / RLE text (COCO and refined sources). An unusable sample raises `SampleError` in
`load_sample` and yields no row (with a warning) in the stage.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import orjson
from PIL import Image

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError
from hqsam.hqsam_core.images import ImageDecodeError, decode_at_recorded_size
from hqsam.hqsam_core.masks import decode_rle, segmentation_to_mask
from hqsam.pipeline.stage import Row, Stage
from hqsam.schemas.train_rows import SAMPLE_SOURCE, LoadedSample, TrainSample

log = logging.getLogger(__name__)

IDS = ("source", "key", "image_id", "annotation_id", "category_id")


class SampleError(HqsamError, ValueError):
    """One sample that cannot be loaded (unreadable image, empty or mismatched mask)."""


class LoadSamples(Stage):
    """Source rows -> training samples {source, key, image, mask}; a bad sample yields no row."""

    reads = tuple(SAMPLE_SOURCE.names)
    adds = ("image", "mask")
    drops = tuple(name for name in SAMPLE_SOURCE.names if name not in ("source", "key"))

    def process(self, rows: list[Row]) -> list[Row]:
        samples: list[Row] = []
        for row in rows:
            try:
                sample = load_sample(row)
            except SampleError as error:
                log.warning("skipping sample %s: %s", row.get("key"), error)
                continue
            samples.append(_train_sample(sample))
        return samples


def _train_sample(sample: LoadedSample) -> TrainSample:
    return {
        "source": sample["source"],
        "key": sample["key"],
        "image": sample["image"],
        "mask": sample["mask"].astype(np.uint8),
    }


def load_sample(row: Row) -> LoadedSample:
    """Read one source row's image and masks. Raises SampleError for an unusable sample."""
    image = _read_image(row)
    height, width = image.shape[:2]
    mask = _mask(row, "mask_uri", "segmentation", height, width)
    if mask is None:
        raise SampleError(f"{row['key']} has no mask")
    if mask.shape != (height, width):
        raise SampleError(f"{row['key']}: mask is {mask.shape[1]}x{mask.shape[0]}, image {width}x{height}")
    if not mask.any():
        raise SampleError(f"{row['key']}: the mask is empty")
    original = _mask(row, "original_uri", "original_segmentation", height, width)
    if original is not None and original.shape != (height, width):
        raise SampleError(f"{row['key']}: original mask size differs from the image")
    return {"image": image, "mask": mask, "original": original, **{k: row.get(k) for k in IDS}}


def _read_image(row: Row) -> np.ndarray:
    uri = row["image_uri"]
    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError):
        raise SampleError(f"no image at {storage.redact(uri)}") from None
    except Exception as error:
        raise SampleError(f"cannot read {storage.redact(uri)} ({error})") from None
    try:
        return decode_at_recorded_size(data, row.get("height"), row.get("width"))
    except ImageDecodeError as error:
        raise SampleError(f"{storage.redact(uri)}: {error}") from None


def gt_to_mask(image: Image.Image) -> np.ndarray:
    """A gt PNG -> bool foreground.

    Palette (label) images: every index but 0 and 255 (VOC's "void" band) is foreground, or index
    255 when it is the only one. Gray or RGB images: value > 128 when the image uses values above
    128 (0/255 masks, anti-aliased masks; the official protocol's `gt > 128`), else any nonzero.
    """
    if image.mode == "P":
        values = np.asarray(image)
        labels = (values != 0) & (values != 255)
        return labels if labels.any() else values == 255
    if image.mode not in ("L", "1", "I", "I;16", "F"):
        image = image.convert("L")
    values = np.asarray(image)
    return values > 128 if values.max(initial=0) > 128 else values > 0


def _mask(row: Row, uri_column: str, text_column: str, height: int, width: int) -> np.ndarray | None:
    if row.get(uri_column):
        return _read_png_mask(row[uri_column])
    if row.get(text_column):
        return _decode_segmentation(row[text_column], height, width)
    return None


def _read_png_mask(uri: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
            image.load()
            return gt_to_mask(image)
    except FileNotFoundError:
        raise SampleError(f"no file at {storage.redact(uri)}") from None
    except Exception as error:
        raise SampleError(f"{storage.redact(uri)} is not a readable mask PNG ({error})") from None


def _decode_segmentation(text: str, height: int, width: int) -> np.ndarray:
    try:
        value = orjson.loads(text)
        if isinstance(value, dict) and "counts" in value and list(value.get("size", [])) == [height, width]:
            return decode_rle(value)
        return segmentation_to_mask(value, height, width)
    except (ValueError, TypeError, orjson.JSONDecodeError) as error:
        raise SampleError(f"unusable segmentation ({error})") from None
