"""Decoding image bytes into the HxWx3 uint8 RGB arrays the model takes."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from hqsam.hqsam_core.errors import HqsamError, one_line


class ImageDecodeError(HqsamError, ValueError):
    """The bytes are not a complete, decodable image; the message is one line."""


def decode_image(data: bytes, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode to HxWx3 uint8 RGB; converts grayscale, RGBA, CMYK, palette and 16-bit images.

    With `expected_size` (h, w), the EXIF orientation is applied only when that makes the
    decoded size match (COCO records the size of the stored pixels; some tools record the rotated one).
    """
    if not data:
        raise ImageDecodeError("the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # decodes fully: a truncated file raises here instead of turning grey
    except Exception as error:
        raise ImageDecodeError(f"not a decodable image ({one_line(error)})") from None
    if expected_size is not None and _size(image) != tuple(expected_size):
        rotated = ImageOps.exif_transpose(image)
        if _size(rotated) == tuple(expected_size):
            image = rotated
    return to_rgb(image)


class ImageSizeMismatchError(ImageDecodeError):
    """The image decodes to another size than its record says."""


def decode_at_recorded_size(data: bytes, height: int | None, width: int | None) -> np.ndarray:
    """`decode_image` for an image whose record gives its size (None or <= 0: unknown).

    Raises ImageSizeMismatchError when a known size differs from the decoded one, ImageDecodeError
    when the bytes do not decode."""
    known = height is not None and width is not None and height > 0 and width > 0
    pixels = decode_image(data, (int(height), int(width)) if known else None)
    decoded_height, decoded_width = pixels.shape[:2]
    if known and (decoded_height, decoded_width) != (height, width):
        raise ImageSizeMismatchError(
            f"decodes to {decoded_width}x{decoded_height}, its record says {int(width)}x{int(height)}"
        )
    return pixels


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8 RGB (16/32-bit gray is scaled, alpha is dropped)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        gray = np.clip(np.round(pixels * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if image.mode == "P" else image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _size(image: Image.Image) -> tuple[int, int]:
    return image.height, image.width
