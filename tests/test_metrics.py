import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from hqsam.hqsam_core.metrics import (
    boundary_dilation,
    boundary_iou,
    boundary_iou_batch,
    mask_iou,
    mask_iou_batch,
)


def _naive_cv2_erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    """cv2.erode(mask, ones((3, 3)), iterations=...) with cv2's default border (neutral for erosion)."""
    h, w = mask.shape
    cur = mask.copy()
    for _ in range(iterations):
        nxt = np.zeros_like(cur)
        for i in range(h):
            for j in range(w):
                nxt[i, j] = all(
                    cur[y, x]
                    for y in range(max(0, i - 1), min(h, i + 2))
                    for x in range(max(0, j - 1), min(w, j + 2))
                )
        cur = nxt
    return cur


def _naive_boundary(mask: np.ndarray, dilation_ratio: float) -> np.ndarray:
    """Transcription of mask_to_boundary from the official boundary-iou-api."""
    h, w = mask.shape
    dilation = int(round(dilation_ratio * np.sqrt(h**2 + w**2)))
    if dilation < 1:
        dilation = 1
    padded = np.zeros((h + 2, w + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask
    eroded = _naive_cv2_erode(padded, dilation)[1 : h + 1, 1 : w + 1]
    return mask & ~eroded


def _naive_boundary_iou(a: np.ndarray, b: np.ndarray, dilation_ratio: float) -> float:
    ba, bb = _naive_boundary(a, dilation_ratio), _naive_boundary(b, dilation_ratio)
    union = (ba | bb).sum()
    return 1.0 if union == 0 else (ba & bb).sum() / union


def _shapes(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Unions of random rectangles, many of them cut by the image border, plus plain noise."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for m in masks[: n // 2]:
        for _ in range(rng.integers(1, 4)):
            y0, x0 = rng.integers(-3, h), rng.integers(-3, w)
            m[max(0, y0) : y0 + rng.integers(1, h + 3), max(0, x0) : x0 + rng.integers(1, w + 3)] = True
    masks[n // 2 :] = rng.random((n - n // 2, h, w)) < 0.6
    return masks


def _cases(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = _shapes(10, h, w, seed), _shapes(10, h, w, seed + 1)
    empty, full = np.zeros((h, w), bool), np.ones((h, w), bool)
    extra_a = np.stack([empty, empty, full, full, a[0], full])
    extra_b = np.stack([empty, full, full, empty, empty, a[0]])
    return np.concatenate([a, extra_a]), np.concatenate([b, extra_b])


def test_mask_iou_edge_cases():
    empty, full = np.zeros((4, 5), bool), np.ones((4, 5), bool)
    assert mask_iou(empty, empty) == 1.0
    assert mask_iou(empty, full) == 0.0
    assert mask_iou(full, full) == 1.0
    half = full.copy()
    half[:, :2] = False
    assert mask_iou(half, full) == pytest.approx(12 / 20)


def test_mask_iou_matches_pycocotools():
    a, b = _shapes(12, 13, 17, seed=4), _shapes(12, 13, 17, seed=5)
    rles_a = mask_utils.encode(np.asfortranarray(a.transpose(1, 2, 0).astype(np.uint8)))
    rles_b = mask_utils.encode(np.asfortranarray(b.transpose(1, 2, 0).astype(np.uint8)))
    expected = np.array(
        [mask_utils.iou([ra], [rb], [0])[0, 0] for ra, rb in zip(rles_a, rles_b, strict=True)]
    )
    np.testing.assert_allclose(mask_iou_batch(a, b), expected)
    np.testing.assert_allclose([mask_iou(x, y) for x, y in zip(a, b, strict=True)], expected)


@pytest.mark.parametrize(
    ("h", "w", "ratio", "expected"),
    [(6, 8, 0.0, 1), (6, 8, 0.125, 1), (6, 8, 0.25, 2), (6, 8, 0.75, 8), (480, 640, 0.02, 16)],
)
def test_boundary_dilation_rounds_like_python(h, w, ratio, expected):
    # Diagonal 10: 2.5 rounds half-to-even down to 2, 7.5 up to 8; 0 is raised to 1.
    assert boundary_dilation(h, w, ratio) == expected


def test_boundary_iou_hand_computed():
    # d = 1 on a 5x5 image: a full mask's boundary is its 16-pixel outer ring, because the
    # image border counts as background; the 5x4 block's ring has 14 pixels, 11 shared.
    full = np.ones((5, 5), bool)
    block = full.copy()
    block[:, 4] = False
    assert boundary_iou(full, block, dilation_ratio=0.1) == pytest.approx(11 / 19)
    assert boundary_iou(full, full) == 1.0


def test_boundary_iou_edge_cases():
    empty, full = np.zeros((9, 11), bool), np.ones((9, 11), bool)
    assert boundary_iou(empty, empty) == 1.0
    assert boundary_iou(empty, full) == 0.0
    assert not np.isnan(boundary_iou_batch(np.stack([empty] * 3), np.stack([empty] * 3))).any()


@pytest.mark.parametrize(("h", "w"), [(7, 9), (13, 17), (21, 11), (1, 5), (3, 1)])
@pytest.mark.parametrize("ratio", [0.0, 0.02, 0.1, 0.17, 0.3, 0.6])
def test_boundary_iou_matches_naive_reference(h, w, ratio):
    a, b = _cases(h, w, seed=h * 100 + w)
    expected = np.array([_naive_boundary_iou(x, y, ratio) for x, y in zip(a, b, strict=True)])
    np.testing.assert_allclose(boundary_iou_batch(a, b, ratio, chunk=4), expected)
    np.testing.assert_allclose([boundary_iou(x, y, ratio) for x, y in zip(a, b, strict=True)], expected)


def test_batched_equals_single_and_accepts_tensors():
    a, b = _cases(19, 23, seed=7)
    single = [boundary_iou(x, y, 0.05) for x, y in zip(a, b, strict=True)]
    np.testing.assert_array_equal(boundary_iou_batch(a, b, 0.05), single)
    np.testing.assert_array_equal(boundary_iou_batch(torch.from_numpy(a), torch.from_numpy(b), 0.05), single)
    np.testing.assert_array_equal(boundary_iou_batch(a, b, 0.05, chunk=3), single)
    single_iou = [mask_iou(torch.from_numpy(x), y) for x, y in zip(a, b, strict=True)]
    np.testing.assert_array_equal(mask_iou_batch(a, b, chunk=5), single_iou)


def test_flipped_views_give_same_scores():
    # Mirroring both masks leaves Boundary IoU unchanged; flipped views also have negative strides.
    a, b = _cases(11, 14, seed=9)
    np.testing.assert_allclose(boundary_iou_batch(a[:, :, ::-1], b[:, :, ::-1]), boundary_iou_batch(a, b))
    np.testing.assert_allclose(mask_iou_batch(a[:, ::-1], b[:, ::-1]), mask_iou_batch(a, b))


def test_boundary_iou_on_very_wide_image():
    # Sides over 2**15 pixels take the int32 cumulative sums; compare with a direct Chebyshev-window
    # erosion (all shifts within distance d, zero outside the image). d = round(2.0) = 2 here.
    h, w = 5, 33001
    ratio = 2 / np.sqrt(h**2 + w**2)
    rng = np.random.default_rng(3)
    a, b = rng.random((2, h, w)) < 0.9, rng.random((2, h, w)) < 0.9
    a[1, 1:4] = True

    def boundary(m: np.ndarray, d: int = 2) -> np.ndarray:
        padded = np.pad(m, d)
        eroded = np.ones_like(m)
        for dy in range(2 * d + 1):
            for dx in range(2 * d + 1):
                eroded &= padded[dy : dy + h, dx : dx + w]
        return m & ~eroded

    expected = [
        (boundary(x) & boundary(y)).sum() / (boundary(x) | boundary(y)).sum()
        for x, y in zip(a, b, strict=True)
    ]
    np.testing.assert_allclose(boundary_iou_batch(a, b, ratio), expected)


def test_shape_validation():
    with pytest.raises(ValueError):
        mask_iou(np.zeros((3, 4), bool), np.zeros((4, 3), bool))
    with pytest.raises(ValueError):
        boundary_iou_batch(np.zeros((3, 4), bool), np.zeros((3, 4), bool))
    assert boundary_iou_batch(np.zeros((0, 3, 4), bool), np.zeros((0, 3, 4), bool)).shape == (0,)


@pytest.mark.cuda
def test_boundary_iou_on_cuda_matches_cpu():
    a, b = _cases(31, 45, seed=11)
    np.testing.assert_allclose(boundary_iou_batch(a, b, device="cuda"), boundary_iou_batch(a, b))
    cuda_a, cuda_b = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
    np.testing.assert_allclose(boundary_iou_batch(cuda_a, cuda_b), boundary_iou_batch(a, b))


def test_boundary_iou_batch_many_large_masks():
    n, h, w = 200, 480, 640
    yy, xx = np.ogrid[:h, :w]
    rng = np.random.default_rng(0)
    cy, cx = rng.uniform(0, h, n), rng.uniform(0, w, n)
    ry, rx = rng.uniform(20, 200, n), rng.uniform(20, 250, n)

    def ellipses(dy: float, dx: float) -> np.ndarray:
        return np.stack(
            [((yy - cy[i] - dy) / ry[i]) ** 2 + ((xx - cx[i] - dx) / rx[i]) ** 2 <= 1 for i in range(n)]
        )

    a, b = ellipses(0, 0), ellipses(3, -2)
    scores = boundary_iou_batch(a, b)
    assert scores.shape == (n,)
    assert np.all((scores > 0) & (scores < 1))
    np.testing.assert_array_equal(boundary_iou_batch(a[:20], a[:20]), np.ones(20))


def test_ious_in_each_pairs_box_equal_the_whole_image():
    """The CPU path compares each pair on the box around its two masks: exactly the whole-image
    result, for small objects, objects on the border, disjoint pairs and empty masks alike."""
    from hqsam.hqsam_core.metrics import _boundary_ious_whole, mask_and_boundary_ious

    h, w = 120, 160
    a, b = _cases(h, w, seed=3)
    small_a, small_b = np.zeros((4, h, w), bool), np.zeros((4, h, w), bool)
    small_a[0, 10:18, 20:31], small_b[0, 11:19, 19:30] = True, True  # a small object, shifted
    small_a[1, 0:9, 150:160], small_b[1, 0:7, 152:160] = True, True  # in a corner
    small_a[2, 50:60, 50:60], small_b[2, 90:99, 100:110] = True, True  # two objects apart
    small_a[3, 40:41, 40:41] = True  # one pixel against nothing
    a, b = torch.from_numpy(np.concatenate([a, small_a])), torch.from_numpy(np.concatenate([b, small_b]))
    d = boundary_dilation(h, w, 0.02)
    whole = _boundary_ious_whole(a, b, d, chunk=8, device=None)
    ious, boundary_ious = mask_and_boundary_ious(a, b)
    np.testing.assert_array_equal(boundary_ious, whole)
    np.testing.assert_array_equal(boundary_iou_batch(a, b), whole)
    np.testing.assert_array_equal(ious, mask_iou_batch(a, b))
    assert 0 < whole[-4] < 1 and whole[-2] == 0 and whole[-1] == 0
