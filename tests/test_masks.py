import numpy as np
import pytest
from pycocotools import mask as mask_utils

from hqsam.hqsam_core.masks import (
    bbox_xywh_to_xyxy,
    bbox_xyxy_to_xywh,
    decode_rle,
    encode_rle,
    encode_rles,
    mask_to_bbox,
    polygons_to_mask,
    rle_area,
    segmentation_to_mask,
    tight_box_pixel_edges,
)


def _random_masks(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n, h, w)) < rng.random((n, 1, 1))


def _coco_encode(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _rect(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    # COCO rasterises an integer-cornered axis-aligned polygon as the half-open pixel block.
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _rect_poly(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def test_rle_round_trip_has_str_counts():
    for mask in _random_masks(5, 17, 23):
        rle = encode_rle(mask)
        assert rle["size"] == [17, 23]
        assert isinstance(rle["counts"], str)
        assert rle["counts"] == _coco_encode(mask)["counts"].decode("ascii")
        np.testing.assert_array_equal(decode_rle(rle), mask)


def test_encode_rle_accepts_uint8():
    mask = _random_masks(1, 9, 4)[0]
    assert encode_rle(mask.astype(np.uint8)) == encode_rle(mask)


def test_decode_rle_accepts_bytes_counts():
    mask = _random_masks(1, 11, 13, seed=3)[0]
    decoded = decode_rle(_coco_encode(mask))
    assert decoded.dtype == bool
    np.testing.assert_array_equal(decoded, mask)


def test_encode_rles_matches_single_encodes():
    masks = _random_masks(6, 13, 8, seed=1)
    rles = encode_rles(masks)
    assert rles == [encode_rle(m) for m in masks]
    assert encode_rles(np.zeros((0, 4, 5), dtype=bool)) == []
    with pytest.raises(ValueError):
        encode_rles(masks[0])


def test_decode_uncompressed_rle():
    # Column-major runs on a 3x4 image: 2 off, 3 on, 7 off -> flat indices 2, 3, 4.
    rle = {"size": [3, 4], "counts": [2, 3, 7]}
    expected = np.zeros((3, 4), dtype=bool)
    expected[2, 0] = expected[0, 1] = expected[1, 1] = True
    np.testing.assert_array_equal(decode_rle(rle), expected)
    assert rle_area(rle) == 3


def test_multi_part_polygon_is_union():
    h, w = 8, 10
    polys = [_rect_poly(1, 1, 5, 4), _rect_poly(3, 2, 8, 7), _rect_poly(0, 6, 2, 8)]
    expected = _rect(h, w, 1, 1, 5, 4) | _rect(h, w, 3, 2, 8, 7) | _rect(h, w, 0, 6, 2, 8)
    np.testing.assert_array_equal(polygons_to_mask(polys, h, w), expected)


def test_polygon_union_matches_per_part_pycocotools():
    h, w = 21, 19
    polys = [[2.3, 1.7, 15.2, 4.1, 9.8, 18.6], [10.5, 3.0, 18.0, 10.0, 12.0, 20.0, 4.0, 12.5]]
    expected = np.zeros((h, w), dtype=bool)
    for p in polys:
        expected |= mask_utils.decode(mask_utils.frPyObjects([p], h, w)[0]).astype(bool)
    assert expected.any()
    np.testing.assert_array_equal(polygons_to_mask(polys, h, w), expected)


def test_polygons_with_degenerate_parts():
    h, w = 6, 7
    good = _rect_poly(1, 1, 4, 5)
    # A 4-number part first would make frPyObjects read every part as a bbox.
    polys = [[0, 0, 2, 2], good, [3.0, 3.0], [], [1, 1, 2, 2, 3, 3, 4]]
    expected = _rect(h, w, 1, 1, 4, 5) | polygons_to_mask([[1, 1, 2, 2, 3, 3, 4]], h, w)
    np.testing.assert_array_equal(polygons_to_mask(polys, h, w), expected)
    np.testing.assert_array_equal(polygons_to_mask([[0, 0, 2, 2], [5.0, 1.0]], h, w), np.zeros((h, w), bool))
    np.testing.assert_array_equal(polygons_to_mask([], h, w), np.zeros((h, w), bool))


def test_segmentation_to_mask_dispatch():
    h, w = 5, 6
    expected = _rect(h, w, 1, 0, 4, 3)
    compressed = _coco_encode(expected)
    as_str = {"size": compressed["size"], "counts": compressed["counts"].decode("ascii")}
    # Column-major runs: column 0 off, columns 1-3 have 3 on then 2 off, columns 4-5 off.
    uncompressed = {"size": [h, w], "counts": [5, 3, 2, 3, 2, 3, 12]}
    for seg in ([_rect_poly(1, 0, 4, 3)], compressed, as_str, uncompressed):
        np.testing.assert_array_equal(segmentation_to_mask(seg, h, w), expected)


@pytest.mark.parametrize("seg", ["abc", 3, None, {"counts": "x"}, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
def test_segmentation_to_mask_rejects_unknown_forms(seg):
    with pytest.raises(ValueError):
        segmentation_to_mask(seg, 4, 4)


def test_segmentation_to_mask_rejects_size_mismatch():
    with pytest.raises(ValueError, match="does not match"):
        segmentation_to_mask(encode_rle(np.ones((4, 5), bool)), 5, 4)


def test_bbox_and_area_match_pycocotools():
    masks = _random_masks(8, 15, 22, seed=2)
    masks[0] = False
    masks[1] = True
    masks[2] = False
    masks[2, 3:7, 9] = True
    for m in masks:
        coco = _coco_encode(m)
        assert mask_to_bbox(m) == mask_utils.toBbox(coco).tolist()
        assert rle_area(encode_rle(m)) == int(mask_utils.area(coco)) == int(m.sum())
    assert mask_to_bbox(masks[2]) == [9.0, 3.0, 1.0, 4.0]
    assert mask_to_bbox(masks[0]) == [0.0, 0.0, 0.0, 0.0]


def test_bbox_conversions():
    assert bbox_xywh_to_xyxy([1, 2, 3, 4]) == [1.0, 2.0, 4.0, 6.0]
    assert bbox_xyxy_to_xywh([1, 2, 4, 6]) == [1.0, 2.0, 3.0, 4.0]
    assert bbox_xyxy_to_xywh(bbox_xywh_to_xyxy([0.5, 1.5, 2.25, 3.0])) == [0.5, 1.5, 2.25, 3.0]


def test_mask_tight_box():
    mask = np.zeros((7, 6), dtype=bool)
    mask[2, 3] = mask[4, 1] = True
    assert tight_box_pixel_edges(mask) == [1.0, 2.0, 4.0, 5.0]
    assert tight_box_pixel_edges(np.ones((3, 4), bool)) == [0.0, 0.0, 4.0, 3.0]
    assert tight_box_pixel_edges(np.zeros((3, 4), bool)) is None
