"""Crop-zoom coordinate maths: refine a small box on a crop around it, paste the mask back.

Conventions (SAM's): a box is XYXY in continuous pixel coordinates, pixel (row i, column j)
covering [j, j+1) x [i, i+1). A crop window is a half-open integer pixel range
[x0, x1) x [y0, y1) of the image: crop pixel (i, j) is image pixel (i + y0, j + x0), and a
continuous coordinate x in the image is x - x0 in the crop. Everything here is pure numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_CONTEXT = 0.5  # margin on each side, as a fraction of the box's longer side
DEFAULT_MIN_CROP = 64  # pixels: a crop side is at least this (where the image allows)


@dataclass(frozen=True)
class CropWindow:
    """Half-open integer pixel window [x0, x1) x [y0, y1) of an image."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def as_array(self) -> np.ndarray:
        return np.array([self.x0, self.y0, self.x1, self.y1], dtype=np.int64)


def crop_window(
    box: np.ndarray | tuple[float, float, float, float],
    image_size: tuple[int, int],
    *,
    context: float = DEFAULT_CONTEXT,
    min_crop: int = DEFAULT_MIN_CROP,
) -> CropWindow | None:
    """The crop around `box` (XYXY) in an image of `image_size` (h, w); None if the box misses the image.

    The box, clipped to the image, is grown by `context` x its longer side on each side; an axis
    shorter than `min_crop` is grown to `min_crop` about the box centre; the result is rounded
    outwards to whole pixels (floor / ceil) and clipped to the image.
    """
    height, width = image_size
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    if x1 < x0 or y1 < y0 or x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return None
    x0, x1 = max(x0, 0.0), min(x1, float(width))
    y0, y1 = max(y0, 0.0), min(y1, float(height))
    margin = context * max(x1 - x0, y1 - y0)
    left, right = _grow(x0 - margin, x1 + margin, min_crop)
    top, bottom = _grow(y0 - margin, y1 + margin, min_crop)
    window = CropWindow(
        x0=max(0, math.floor(left)),
        y0=max(0, math.floor(top)),
        x1=min(width, math.ceil(right)),
        y1=min(height, math.ceil(bottom)),
    )
    return window if window.width > 0 and window.height > 0 else None


def _grow(low: float, high: float, min_size: float) -> tuple[float, float]:
    if high - low >= min_size:
        return low, high
    centre = (low + high) / 2
    return centre - min_size / 2, centre + min_size / 2


def zoom_selection(boxes: np.ndarray, image_size: tuple[int, int], crop_zoom: float) -> np.ndarray:
    """(N,) bool: boxes whose longer side is below `crop_zoom` x the image's longer side."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    longer = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return longer < crop_zoom * max(image_size)


def box_to_crop(boxes: np.ndarray, window: CropWindow) -> np.ndarray:
    """XYXY boxes in image coordinates -> the same boxes in the crop's coordinates (float32)."""
    offset = np.array([window.x0, window.y0, window.x0, window.y0], dtype=np.float64)
    return (np.asarray(boxes, dtype=np.float64) - offset).astype(np.float32)


def crop_image(image: np.ndarray, window: CropWindow) -> np.ndarray:
    """The window's pixels of an HxWxC image, as a contiguous copy."""
    return np.ascontiguousarray(image[window.y0 : window.y1, window.x0 : window.x1])


def paste_masks(masks: np.ndarray, window: CropWindow, image_size: tuple[int, int]) -> np.ndarray:
    """(N, crop_h, crop_w) masks -> (N, H, W) masks of the image, False outside the window."""
    masks = np.asarray(masks)
    if masks.shape[1:] != (window.height, window.width):
        raise ValueError(f"masks of shape {masks.shape[1:]} do not fit a {window.height}x{window.width} crop")
    full = np.zeros((masks.shape[0], *image_size), dtype=masks.dtype)
    full[:, window.y0 : window.y1, window.x0 : window.x1] = masks
    return full
