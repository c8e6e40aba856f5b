"""Guided prompts (hqsam_core/guided.py): the mask prompt, point sampling, and refine_guided against
the refiner given the same prompts (the refiner's prompts are proven against the official predictor
in test_refiner_equivalence.py)."""

from __future__ import annotations

import numpy as np
import pytest

from hqsam.hqsam_core import BoxRefiner, build_hqsam
from hqsam.hqsam_core.guided import (
    FALLBACK,
    Guidance,
    disagreement_points,
    mask_prompt,
    refine_guided,
)
from hqsam.hqsam_core.refiner import unpack_masks
from hqsam.hqsam_core.testing.random_weights import randomize_


def test_mask_prompt_is_the_mask_in_the_model_frame_as_logits() -> None:
    mask = np.zeros((100, 200), bool)
    mask[:, :100] = True  # the left half
    prompt = mask_prompt(mask)
    assert prompt.shape == (256, 256) and prompt.dtype == np.float32
    # 200 px wide -> 1024; 100 high -> 512: rows 0-127 hold the image, the rest is padding.
    assert (prompt[:128, :126] > 6).all() and (prompt[:128, 130:] < -6).all()
    assert (prompt[130:] < -6).all()


def test_disagreement_points_are_labelled_by_the_side_that_covers() -> None:
    refined = np.zeros((20, 20), bool)
    original = np.zeros((20, 20), bool)
    refined[0:10, 0:10] = True
    original[5:15, 5:15] = True
    rng = np.random.default_rng(0)
    coords, labels = disagreement_points(refined, original, 50, rng)
    valid = labels >= 0
    assert valid.sum() == 50 and len(coords) == 50
    xs, ys = (coords[valid] - 0.5).astype(int).T
    assert (labels[valid] == original[ys, xs]).all()
    assert (refined[ys, xs] != original[ys, xs]).all()
    coords, labels = disagreement_points(refined, original, 300, np.random.default_rng(0))
    assert (labels == -1).sum() == 300 - 150  # only 150 pixels disagree: the rest is padding
    assert disagreement_points(refined, refined, 3, rng) is None
    again = disagreement_points(refined, original, 4, np.random.default_rng(7))
    np.testing.assert_array_equal(
        again[0], disagreement_points(refined, original, 4, np.random.default_rng(7))[0]
    )


def _scene(seed: int = 3):
    rng = np.random.default_rng(seed)
    image = np.kron(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    boxes = np.array([[20, 30, 200, 180], [150, 60, 300, 230], [10, 10, 90, 90]], np.float32)
    originals = []
    for x0, y0, x1, y1 in boxes.astype(int):
        mask = np.zeros(image.shape[:2], bool)
        mask[y0 + 10 : y1 - 20, x0 + 5 : x1 - 5] = True
        originals.append(mask)
    originals[2] = None  # no readable mask: the box alone
    return image, boxes, originals


@pytest.fixture(scope="module")
def refiner() -> BoxRefiner:
    return BoxRefiner(randomize_(build_hqsam("vit_tiny"), seed=4), max_prompts=2)


def _guided(refiner, image, boxes, originals, guidance, **options):
    (chunk,) = refine_guided(
        refiner, [image], [boxes], [originals], [[5, 6, 7]], guidance, with_logits=True, **options
    )
    return chunk


def test_box_mask_prompt_is_the_original_as_mask_input(refiner) -> None:
    image, boxes, originals = _scene()
    chunk = _guided(refiner, image, boxes, originals, Guidance("box+mask"))
    (with_mask,) = refiner.refine(
        [image], [boxes[:2]], mask_inputs=[np.stack([mask_prompt(m) for m in originals[:2]])]
    )
    (plain,) = refiner.refine([image], [boxes[2:]])
    np.testing.assert_allclose(chunk.logits[:2], with_mask.logits, atol=1e-5)
    np.testing.assert_allclose(chunk.logits[2:], plain.logits, atol=1e-5)
    masks = unpack_masks(chunk.packed_masks, *image.shape[:2])
    assert (masks[:2] != with_mask.masks).mean() < 1e-4
    np.testing.assert_allclose(chunk.stability[:2], with_mask.stability, atol=1e-5)
    np.testing.assert_allclose(chunk.sam_hq_iou[2:], plain.sam_hq_iou, atol=1e-5)


def test_box_points_round_is_the_average_of_its_trials(refiner) -> None:
    """K=1, P=2, T=3: the points are those sampled from the box pass's masks with the annotation's
    seed; the logits are the mean of the three decodes with them."""
    image, boxes, originals = _scene()
    guidance = Guidance("box+points", rounds=1, points=2, trials=3, seed=11)
    chunk = _guided(refiner, image, boxes, originals, guidance)
    (first,) = refiner.refine([image], [boxes])
    trials = []
    for trial in range(3):
        coords, labels = zip(
            *[
                disagreement_points(
                    first.masks[k], originals[k], 2, np.random.default_rng([11, key, 0, trial])
                )
                for k, key in ((0, 5), (1, 6))
            ]
        )
        (result,) = refiner.refine(
            [image], [boxes[:2]], points=[np.stack(coords)], point_labels=[np.stack(labels)]
        )
        trials.append(result)
    mean = np.mean([t.logits for t in trials], axis=0)
    np.testing.assert_allclose(chunk.logits[:2], mean, atol=1e-4)
    np.testing.assert_allclose(chunk.scores[:2], np.mean([t.scores for t in trials], axis=0), atol=1e-5)
    np.testing.assert_allclose(chunk.logits[2], first.logits[2], atol=1e-5)  # no original: box alone
    assert np.abs(chunk.logits[:2] - first.logits[:2]).max() > 0.1


def test_guided_masks_are_the_same_on_every_run_and_follow_the_seed(refiner) -> None:
    image, boxes, originals = _scene()
    guidance = Guidance("box+points", rounds=2, points=3, trials=2)
    a = _guided(refiner, image, boxes, originals, guidance)
    b = _guided(refiner, image, boxes, originals, guidance)
    np.testing.assert_array_equal(a.packed_masks, b.packed_masks)
    np.testing.assert_array_equal(a.logits, b.logits)
    c = _guided(
        refiner, image, boxes, originals, Guidance("box+points", rounds=2, points=3, trials=2, seed=1)
    )
    assert not np.array_equal(a.logits, c.logits)


def test_guidance_checks_its_settings() -> None:
    with pytest.raises(ValueError, match="prompt must be one of"):
        Guidance("points")
    with pytest.raises(ValueError, match="trials"):
        Guidance("box+points", trials=0)
    assert Guidance("box+mask").kind(False) == FALLBACK and Guidance("box+mask").kind(True) == "box+mask"
    assert Guidance().kind(False) == "box"
