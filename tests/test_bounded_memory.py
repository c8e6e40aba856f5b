"""Memory per image bounded by the decoder chunk, not the box count (issue 12, item 9).

The refiner hands each decoder call's masks out as soon as they are made (`refine_chunks`), the
refine stage keeps only their packed bits, and the encode stage unpacks a few masks at a time.
"""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from hqsam.hqsam_core import BoxRefiner
from hqsam.hqsam_core.refiner import pack_masks
from hqsam.pipeline.encode_masks import MASKS_PER_GROUP, EncodeMasks
from hqsam.schemas.status import Status
from tests.test_fast_attention import small_vit_hqsam


@pytest.fixture(scope="module")
def refiner() -> BoxRefiner:
    return BoxRefiner(small_vit_hqsam(seed=3), max_prompts=3)


def _images_and_boxes() -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(5)
    sizes = [(120, 160), (90, 70), (64, 96)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    boxes = []
    for (h, w), count in zip(sizes, [5, 0, 4]):  # 3-prompt chunks straddle the two images with boxes
        x0, y0 = rng.uniform(0, w / 2, count), rng.uniform(0, h / 2, count)
        x1, y1 = x0 + rng.uniform(4, w / 2, count), y0 + rng.uniform(4, h / 2, count)
        boxes.append(np.stack([x0, y0, x1, y1], axis=1).astype(np.float32))
    return images, boxes


@pytest.mark.slow
@pytest.mark.parametrize("crop_zoom", [None, 0.3])
def test_refine_chunks_put_together_equal_refine(refiner: BoxRefiner, crop_zoom: float | None) -> None:
    images, boxes = _images_and_boxes()
    expected = refiner.refine(images, boxes, crop_zoom=crop_zoom)
    seen = [np.zeros(len(b), int) for b in boxes]
    for chunk in refiner.refine_chunks(images, boxes, crop_zoom=crop_zoom, with_logits=True):
        assert 1 <= len(chunk.rows) <= refiner.max_prompts
        want = expected[chunk.image]
        np.testing.assert_array_equal(chunk.packed_masks, want.packed_masks[chunk.rows])
        np.testing.assert_array_equal(chunk.scores, want.scores[chunk.rows])
        np.testing.assert_array_equal(chunk.logits, want.logits[chunk.rows])
        if crop_zoom is None:
            assert chunk.crops is None
        else:
            np.testing.assert_array_equal(chunk.crops, want.crops[chunk.rows])
        seen[chunk.image][chunk.rows] += 1
    assert [s.tolist() for s in seen] == [[1] * len(b) for b in boxes]  # every box exactly once
    if crop_zoom is not None:
        assert (expected[0].crops[:, 0] >= 0).any() and (expected[0].crops[:, 0] < 0).any()


@pytest.mark.slow
def test_refine_chunks_hands_out_each_decoder_call_before_the_next(refiner: BoxRefiner) -> None:
    images, boxes = _images_and_boxes()
    calls = []
    hook = refiner.model.mask_decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        chunks = refiner.refine_chunks(images, boxes)
        assert not calls  # nothing decoded before it is asked for
        first = next(chunks)
        assert len(calls) == 1 and first.logits is None and len(first.rows) == refiner.max_prompts
        rest = list(chunks)
    finally:
        hook.remove()
    assert len(calls) == 3 and sum(len(c.rows) for c in [first, *rest]) == 9  # 9 boxes, 3 per call


def _encode_row(masks: np.ndarray, statuses: list[Status], segmentations: list[str]) -> dict:
    count = len(statuses)
    row = {
        "height": masks.shape[1],
        "width": masks.shape[2],
        "segmentations": segmentations,
        "statuses": statuses,
        "errors": [""] * count,
        "packed_masks": pack_masks(masks),
    }
    (row,) = EncodeMasks().process([row])
    return row


def test_encode_masks_in_groups_equal_one_mask_at_a_time() -> None:
    """Groups of MASKS_PER_GROUP with failed annotations between ok ones: each row keeps its own mask."""
    rng = np.random.default_rng(0)
    count = 2 * MASKS_PER_GROUP + 7
    statuses = [Status.INFERENCE_FAILED if k % 5 == 2 else Status.OK for k in range(count)]
    ok = [k for k, s in enumerate(statuses) if s == Status.OK]
    masks = rng.random((len(ok), 30, 40)) < rng.random((len(ok), 1, 1))
    segmentations = [json.dumps([[4.0, 4.0, 30.0, 4.0, 30.0, 20.0]]) if k % 3 else "" for k in range(count)]
    row = _encode_row(masks, statuses, segmentations)
    for mask, k in zip(masks, ok):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert row["rle_counts"][k] == rle["counts"].decode()
        assert row["areas"][k] == mask.sum()
        np.testing.assert_allclose(row["refined_bboxes"][k], mask_utils.toBbox(rle))
        if segmentations[k]:
            theirs = mask_utils.decode(
                mask_utils.merge(mask_utils.frPyObjects([[4, 4, 30, 4, 30, 20]], 30, 40))
            )
            union = (mask | theirs.astype(bool)).sum()
            assert row["ious"][k] == pytest.approx((mask & theirs.astype(bool)).sum() / union, abs=1e-6)
        else:
            assert np.isnan(row["ious"][k])
    failed = [k for k in range(count) if k not in ok]
    assert all(row["rle_counts"][k] == "" for k in failed) and (row["areas"][failed] == -1).all()


def test_encode_masks_peak_memory_is_a_few_masks_not_the_row() -> None:
    """numpy reports its allocations to tracemalloc: encoding a row of 1024 masks must not unpack
    them all (16 MiB of bool masks) at once."""
    count, height, width = 1024, 128, 128
    packed = np.zeros((count, height * width // 8), np.uint8)
    for k in range(count):  # one mask at a time, so that building the row costs no full stack
        mask = np.zeros((1, height, width), dtype=bool)
        mask[0, k % 100 : k % 100 + 20, 10:60] = True
        packed[k] = pack_masks(mask)[0]
    row = {
        "height": height,
        "width": width,
        "segmentations": [""] * count,
        "statuses": [Status.OK] * count,
        "errors": [""] * count,
        "packed_masks": packed,
    }
    del packed
    tracemalloc.start()
    try:
        (row,) = EncodeMasks().process([row])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert row["areas"].tolist() == [20 * 50] * count
    mask_bytes = height * width
    assert peak < 8 * MASKS_PER_GROUP * mask_bytes < count * mask_bytes / 4, f"peak {peak} bytes"
