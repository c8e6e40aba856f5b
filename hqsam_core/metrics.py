"""Mask IoU and Boundary IoU (Cheng et al. 2021), batched and vectorised with torch."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from hqsam.hqsam_core.arrays import writable

MaskArray = np.ndarray | torch.Tensor


def _as_bool_tensor(masks: MaskArray) -> torch.Tensor:
    if isinstance(masks, torch.Tensor):
        return masks.bool()
    # from_numpy rejects negative strides, e.g. flipped views.
    return torch.from_numpy(writable(np.ascontiguousarray(masks, dtype=bool)))


def _check_pair(a: torch.Tensor, b: torch.Tensor, ndim: int) -> None:
    if a.ndim != ndim or a.shape != b.shape:
        raise ValueError(
            f"expected two masks of the same {ndim}-d shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-mask IoU of two (N, H, W) bool tensors; an empty union counts as a perfect match."""
    # Counting in int32 is much cheaper than summing bools as float64.
    inter = (a & b).flatten(1).sum(1, dtype=torch.int32).double()
    union = (a | b).flatten(1).sum(1, dtype=torch.int32).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def boundary_dilation(height: int, width: int, dilation_ratio: float) -> int:
    """Boundary width in pixels, rounded as the official boundary-iou-api does (Python round, at least 1)."""
    return max(1, int(round(dilation_ratio * math.sqrt(height**2 + width**2))))


def _erode(masks: torch.Tensor, d: int) -> torch.Tensor:
    """Keep pixels whose whole (2d+1)^2 square is foreground, with the outside of the image as background.

    Same result as cv2.erode with a 3x3 kernel iterated d times on the mask zero-padded by one pixel.
    Window sums come from cumulative sums, so the cost does not grow with d.
    """
    k = 2 * d + 1
    # d zeros on each side make the outside background; one more leading zero lets a window sum be
    # a difference of two cumulative sums without special-casing the first window.
    x = F.pad(masks, (d + 1, d, d + 1, d))
    # Sums never exceed the padded side length; int16 halves memory traffic when that fits.
    dtype = torch.int16 if max(x.shape[-2:]) < 2**15 else torch.int32
    for dim in (-1, -2):
        csum = x.cumsum(dim, dtype=dtype)
        n = csum.shape[dim] - k
        x = csum.narrow(dim, k, n) - csum.narrow(dim, 0, n) == k
    return x


def mask_iou_batch(a: MaskArray, b: MaskArray, chunk: int = 64) -> np.ndarray:
    """IoU of each pair of (N, H, W) masks; two empty masks score 1.0."""
    ta, tb = _as_bool_tensor(a), _as_bool_tensor(b)
    _check_pair(ta, tb, 3)
    out = [paired_iou(ta[i : i + chunk], tb[i : i + chunk]) for i in range(0, ta.shape[0], chunk)]
    return torch.cat(out).cpu().numpy() if out else np.zeros(0)


def boundary_iou_batch(
    a: MaskArray,
    b: MaskArray,
    dilation_ratio: float = 0.02,
    chunk: int = 16,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Boundary IoU of each pair of (N, H, W) masks; an empty boundary union scores 1.0.

    The boundary of a mask is its foreground minus its erosion by d pixels (Chebyshev distance), so
    objects cut by the image border keep a boundary along it. On a CPU each pair is computed on the
    box around its two masks, so a small object costs little (the same result: outside that box both
    are background, as outside the image). Elsewhere chunks of `chunk` whole masks are moved to
    `device` (default: where the inputs live) to bound memory.
    """
    ta, tb = _as_bool_tensor(a), _as_bool_tensor(b)
    _check_pair(ta, tb, 3)
    d = boundary_dilation(ta.shape[1], ta.shape[2], dilation_ratio)
    if torch.device(device or ta.device).type == "cpu":
        return _boundary_ious_in_boxes(ta, tb, d)
    return _boundary_ious_whole(ta, tb, d, chunk, device)


def _boundary_ious_whole(
    a: torch.Tensor, b: torch.Tensor, d: int, chunk: int, device: str | torch.device | None
) -> np.ndarray:
    out = []
    for i in range(0, a.shape[0], chunk):
        ca, cb = a[i : i + chunk].to(device), b[i : i + chunk].to(device)
        # The erosion lies inside the mask, so xor is mask minus erosion.
        out.append(paired_iou(ca ^ _erode(ca, d), cb ^ _erode(cb, d)))
    return torch.cat(out).cpu().numpy() if out else np.zeros(0)


def _boundary_ious_in_boxes(a: torch.Tensor, b: torch.Tensor, d: int) -> np.ndarray:
    return _ious_in_boxes(a, b, d)[1]


def mask_and_boundary_ious(
    a: MaskArray, b: MaskArray, dilation_ratio: float = 0.02
) -> tuple[np.ndarray, np.ndarray]:
    """IoU and boundary IoU of each pair of (N, H, W) masks on a CPU, as `mask_iou_batch` and
    `boundary_iou_batch` give them, in one pass over the box around each pair."""
    ta, tb = _as_bool_tensor(a).cpu(), _as_bool_tensor(b).cpu()
    _check_pair(ta, tb, 3)
    return _ious_in_boxes(ta, tb, boundary_dilation(ta.shape[1], ta.shape[2], dilation_ratio))


def _ious_in_boxes(a: torch.Tensor, b: torch.Tensor, d: int) -> tuple[np.ndarray, np.ndarray]:
    """IoU and boundary IoU (erosion by `d`) of each pair of CPU masks, on the box around the two:
    outside it both are background, as outside the image, so nothing changes but the cost."""
    ious, boundary_ious = np.ones(a.shape[0]), np.ones(a.shape[0])  # two empty masks match perfectly
    an, bn = a.numpy(), b.numpy()
    rows, cols = an.any(2) | bn.any(2), an.any(1) | bn.any(1)
    for i in range(a.shape[0]):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if not len(ys):
            continue
        box = (slice(i, i + 1), slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1))
        ca, cb = a[box], b[box]
        ious[i] = paired_iou(ca, cb).item()
        # The erosion lies inside the mask, so xor is mask minus erosion.
        boundary_ious[i] = paired_iou(ca ^ _erode(ca, d), cb ^ _erode(cb, d)).item()
    return ious, boundary_ious


def mask_iou(a: MaskArray, b: MaskArray) -> float:
    """IoU of two HxW masks; two empty masks score 1.0."""
    ta, tb = _as_bool_tensor(a), _as_bool_tensor(b)
    _check_pair(ta, tb, 2)
    return float(mask_iou_batch(ta[None], tb[None])[0])


def boundary_iou(a: MaskArray, b: MaskArray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU of two HxW masks; two masks without boundary pixels score 1.0."""
    ta, tb = _as_bool_tensor(a), _as_bool_tensor(b)
    _check_pair(ta, tb, 2)
    return float(boundary_iou_batch(ta[None], tb[None], dilation_ratio)[0])
