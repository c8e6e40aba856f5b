"""Crop-zoom plumbing: windows, box and mask coordinates between crop and image, exactly.

Every expected number here is worked out by hand from the rule in hqsam_core/crop_zoom.py:
margin = 0.5 x the (clipped) box's longer side on each side, axes shorter than 64 px grown to 64
about the box centre, floor/ceil outwards, clipped to the image.
"""

from __future__ import annotations

import numpy as np
import pytest

from hqsam.hqsam_core import BoxRefiner
from hqsam.hqsam_core.crop_zoom import (
    CropWindow,
    box_to_crop,
    crop_image,
    crop_window,
    paste_masks,
    zoom_selection,
)
from hqsam.hqsam_core.refiner import RefinedChunk, Refinement
from tests.test_fast_attention import small_vit_hqsam

BIG = (3000, 4000)  # (h, w) of a 4000x3000 image


@pytest.mark.parametrize(
    ("box", "size", "window"),
    [
        ((1000, 500, 1100, 560), BIG, (950, 450, 1150, 610)),  # margin 50: no clipping
        ((3950, 2980, 4000, 3000), BIG, (3925, 2955, 4000, 3000)),  # bottom-right corner: clipped
        ((3990, 2990, 4010, 3010), BIG, (3963, 2963, 4000, 3000)),  # partly outside, grown to 64, clipped
        ((0, 0, 30, 10), BIG, (0, 0, 47, 37)),  # top-left: grown to 64 about the centre, clipped
        ((10.5, 20.25, 40.5, 50.75), BIG, (0, 3, 58, 68)),  # fractional: floor / ceil outwards
        ((100, 100, 120, 110), (300, 400), (78, 73, 142, 137)),
    ],
)
def test_crop_window_by_hand(box, size, window) -> None:
    assert crop_window(np.array(box, np.float32), size) == CropWindow(*window)


def test_boxes_outside_the_image_get_no_window() -> None:
    assert crop_window((4100, 10, 4200, 50), BIG) is None
    assert crop_window((-50, 10, 0, 50), BIG) is None
    assert crop_window((30, 10, 20, 50), BIG) is None  # inverted


def test_zoom_selection_threshold() -> None:
    boxes = np.array([[0, 0, 999, 10], [0, 0, 1000, 10], [0, 0, 10, 1200], [5, 5, 6, 6]], np.float32)
    assert zoom_selection(boxes, BIG, 0.25).tolist() == [True, False, False, True]  # 0.25 x 4000 = 1000


def test_mask_drawn_in_crop_coordinates_lands_on_the_right_pixels() -> None:
    window = crop_window((1000, 500, 1100, 560), BIG)
    assert box_to_crop(np.array([[1000, 500, 1100, 560]]), window).tolist() == [[50, 50, 150, 110]]
    assert (window.height, window.width) == (160, 200)
    crop_mask = np.zeros((1, 160, 200), dtype=bool)
    crop_mask[0, 50:110, 50:150] = True  # the box, drawn in crop pixels
    crop_mask[0, 0, 0] = crop_mask[0, 159, 199] = True  # the crop's corners
    full = paste_masks(crop_mask, window, BIG)
    expected = np.zeros((1, *BIG), dtype=bool)
    expected[0, 500:560, 1000:1100] = True
    expected[0, 450, 950] = expected[0, 609, 1149] = True
    assert full.shape == (1, 3000, 4000)
    assert np.array_equal(full, expected)


def test_border_crop_last_pixel_is_the_image_last_pixel() -> None:
    window = crop_window((3950, 2980, 4000, 3000), BIG)
    assert box_to_crop(np.array([3950, 2980, 4000, 3000]), window).tolist() == [25, 25, 75, 45]
    crop_mask = np.zeros((1, 45, 75), dtype=bool)
    crop_mask[0, 44, 74] = True
    full = paste_masks(crop_mask, window, BIG)
    assert full[0, 2999, 3999] and full.sum() == 1
    with pytest.raises(ValueError, match="do not fit"):
        paste_masks(np.zeros((1, 45, 74), bool), window, BIG)


def test_crop_image_is_the_window_of_the_image() -> None:
    image = _coordinate_image(BIG)
    crop = crop_image(image, CropWindow(3925, 2955, 4000, 3000))
    assert crop.shape == (45, 75, 3) and crop.flags.c_contiguous
    assert tuple(crop[0, 0]) == _pixel_code(2955, 3925) and tuple(crop[44, 74]) == _pixel_code(2999, 3999)


def _pixel_code(y: int, x: int) -> tuple[int, int, int]:
    return (x % 256, y % 256, (x // 256) + 16 * (y // 256))


def _coordinate_image(size: tuple[int, int]) -> np.ndarray:
    """Each pixel's colour encodes its (y, x), so a crop's origin can be read off its pixels."""
    y, x = np.mgrid[0 : size[0], 0 : size[1]]
    return np.stack([x % 256, y % 256, x // 256 + 16 * (y // 256)], axis=-1).astype(np.uint8)


def _draw(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Integer XYXY boxes drawn as masks, clipped to the image."""
    masks = np.zeros((len(boxes), *size), dtype=bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.astype(int)):
        mask[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    return masks


def test_refine_plumbing_with_a_model_that_draws_its_boxes(monkeypatch) -> None:
    """The model is replaced by one that returns each box drawn in the frame it was given: a
    zoomed box must come back drawn at its original place in the full image."""
    calls = []

    def fake_whole_chunks(images, boxes, extras=None, *, with_logits, **options):
        calls.append(([image.copy() for image in images], [b.copy() for b in boxes]))
        for index, (image, b) in enumerate(zip(images, boxes)):
            result = Refinement.from_masks(
                masks=_draw(b, image.shape[:2]),
                logits=np.full((len(b), 256, 256), len(calls), np.float32),
                scores=np.full(len(b), image.shape[0] * 10000 + image.shape[1], np.float32),
            )
            rows = np.arange(len(b))
            quality = np.ones(len(b), np.float32)
            yield RefinedChunk(
                index, rows, result.packed_masks, result.scores, quality, quality, result.logits
            )

    refiner = BoxRefiner(small_vit_hqsam())
    monkeypatch.setattr(refiner, "_whole_chunks", fake_whole_chunks)
    images = [_coordinate_image(BIG), _coordinate_image((300, 400))]
    boxes = [
        np.array(
            [
                [1000, 500, 1100, 560],  # zoomed
                [0, 0, 2000, 1500],  # plain: 2000 >= 0.25 x 4000
                [3950, 2980, 4000, 3000],  # zoomed, bottom-right corner
                [3990, 2990, 4010, 3010],  # zoomed, partly outside
                [0, 0, 30, 10],  # zoomed, top-left corner
            ],
            np.float32,
        ),
        np.array([[10, 10, 390, 290], [100, 100, 120, 110]], np.float32),  # plain, zoomed (0.25 x 400)
    ]
    results = refiner.refine(images, boxes, crop_zoom=0.25)

    # 1: the plain call gets both whole images with only their plain boxes
    plain_images, plain_boxes = calls[0]
    assert [i.shape for i in plain_images] == [(3000, 4000, 3), (300, 400, 3)]
    assert [b.tolist() for b in plain_boxes] == [[[0, 0, 2000, 1500]], [[10, 10, 390, 290]]]
    # 2: crops, in batches of at most len(images) = 2, each with its one box in crop coordinates
    windows = [(950, 450, 1150, 610), (3925, 2955, 4000, 3000), (3963, 2963, 4000, 3000), (0, 0, 47, 37)]
    windows += [(78, 73, 142, 137)]
    crop_boxes = [[50, 50, 150, 110], [25, 25, 75, 45], [27, 27, 47, 47], [0, 0, 30, 10], [22, 27, 42, 37]]
    assert [len(c[0]) for c in calls[1:]] == [2, 2, 1]
    crops = [image for c in calls[1:] for image in c[0]]
    given = [b.tolist() for c in calls[1:] for b in c[1]]
    assert given == [[box] for box in crop_boxes]
    for crop, (x0, y0, x1, y1) in zip(crops, windows):
        assert crop.shape == (y1 - y0, x1 - x0, 3)
        assert tuple(crop[0, 0]) == _pixel_code(y0, x0) and tuple(crop[-1, -1]) == _pixel_code(y1 - 1, x1 - 1)
    # 3: every box comes back drawn at its own place in its own image, in the caller's order
    for image, image_boxes, result in zip(images, boxes, results):
        assert np.array_equal(result.masks, _draw(image_boxes, image.shape[:2]))
    assert results[0].crops.tolist() == [list(windows[0]), [-1] * 4, *map(list, windows[1:4])]
    assert results[1].crops.tolist() == [[-1] * 4, list(windows[4])]
    # scores say which frame each box was refined in: whole image or its crop
    assert results[0].scores.tolist() == [
        160 * 10000 + 200,
        3000 * 10000 + 4000,
        45 * 10000 + 75,
        37e4 + 37,
        37e4 + 47,
    ]
    assert results[1].scores.tolist() == [300 * 10000 + 400, 64 * 10000 + 64]


def test_mixed_zoomed_and_plain_boxes_with_a_real_model() -> None:
    """Plain boxes equal a plain refine call exactly; a zoomed box equals refining its crop alone,
    pasted back at the crop's place."""
    refiner = BoxRefiner(small_vit_hqsam(seed=1), max_prompts=4)
    rng = np.random.default_rng(0)
    images = [
        np.kron(rng.integers(0, 256, (75, 100, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8)),  # 600x800
        np.kron(rng.integers(0, 256, (38, 50, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))[:300],
    ]
    small, big, other = [300, 200, 400, 260], [100, 100, 700, 500], [50, 50, 350, 250]
    boxes = [np.array([small, big], np.float32), np.array([other], np.float32)]
    mixed = refiner.refine(images, boxes, crop_zoom=0.25)  # 0.25 x 800 = 200 > 100: small is zoomed

    plain = refiner.refine(images, [np.array([big], np.float32), np.array([other], np.float32)])
    for got, rows, want in [(mixed[0], [1], plain[0]), (mixed[1], [0], plain[1])]:
        assert np.array_equal(got.masks[rows], want.masks)
        assert np.array_equal(got.logits[rows], want.logits)
        assert np.array_equal(got.scores[rows], want.scores)

    # hand: margin 0.5 x 100 = 50 -> window x [250, 450), y [150, 310); box in the crop (50, 50, 150, 110)
    (alone,) = refiner.refine([images[0][150:310, 250:450]], [np.array([[50, 50, 150, 110]], np.float32)])
    expected = np.zeros((600, 800), dtype=bool)
    expected[150:310, 250:450] = alone.masks[0]
    assert np.array_equal(mixed[0].masks[0], expected)
    assert np.array_equal(mixed[0].logits[0], alone.logits[0]) and mixed[0].scores[0] == alone.scores[0]
    assert mixed[0].crops.tolist() == [[250, 150, 450, 310], [-1, -1, -1, -1]]
    assert expected.any() and not expected.all() and mixed[0].masks[1].any()
