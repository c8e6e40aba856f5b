"""The contract: our batched BoxRefiner gives the official HQ-SAM predictor's masks, logits and scores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hqsam.hqsam_core import BoxRefiner, build_hqsam
from hqsam.hqsam_core.testing.random_weights import randomize_

segment_anything_hq = pytest.importorskip("segment_anything_hq")

COMBINATIONS = list(itertools.product([False, True], [False, True]))  # hq_token_only, multimask_output


def _images_and_boxes(seed: int):
    rng = np.random.default_rng(seed)
    sizes = [(300, 420), (200, 200), (517, 261)]
    images = []
    for h, w in sizes:
        base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]
        images.append(np.ascontiguousarray(image))
    boxes = [
        np.array([[10, 20, 200, 250], [150.5, 30.2, 400.7, 290.1], [0, 0, 420, 300]], np.float32),
        np.zeros((0, 4), np.float32),
        np.array([[30, 40, 240, 500], [-20, 300, 280, 540]], np.float32),  # the second is partly outside
    ]
    return images, boxes


def _official(variant: str, state: dict):
    model = segment_anything_hq.sam_model_registry[variant]()
    model.load_state_dict(state, strict=True)
    return segment_anything_hq.SamPredictor(model.eval())


# vit_b's encoder takes ~15 s per image on a 2-core CPU, so it gets one image with boxes and one without;
# vit_tiny checks the multi-image batch (prompts of two images in one decoder chunk).
@pytest.mark.parametrize(
    ("variant", "images_used"), [("vit_tiny", 3), pytest.param("vit_b", 2, marks=pytest.mark.slow)]
)
def test_batched_refiner_equals_official_predictor(variant: str, images_used: int) -> None:
    model = randomize_(build_hqsam(variant), seed=4)  # a seed whose masks cover ~60% of the images
    predictor = _official(variant, model.state_dict())
    refiner = BoxRefiner(model, max_prompts=2)  # several decoder chunks spanning images
    images, boxes = _images_and_boxes(seed=3)
    images, boxes = images[:images_used], boxes[:images_used]

    expected = {combo: [] for combo in COMBINATIONS}
    with torch.no_grad():
        for image, image_boxes in zip(images, boxes):
            if not len(image_boxes):
                continue
            predictor.set_image(image)
            prompt = predictor.transform.apply_boxes_torch(torch.as_tensor(image_boxes), image.shape[:2])
            for hq_only, multi in COMBINATIONS:
                masks, scores, logits = predictor.predict_torch(
                    point_coords=None,
                    point_labels=None,
                    boxes=prompt,
                    multimask_output=multi,
                    hq_token_only=hq_only,
                )
                expected[(hq_only, multi)].append(
                    (masks[:, 0].numpy(), scores[:, 0].numpy(), logits[:, 0].numpy())
                )

    for hq_only, multi in COMBINATIONS:
        results = refiner.refine(images, boxes, hq_token_only=hq_only, multimask_output=multi)
        assert len(results) == len(images)
        assert results[1].masks.shape == (0, 200, 200) and results[1].logits.shape == (0, 256, 256)
        official = iter(expected[(hq_only, multi)])
        for image, image_boxes, result in zip(images, boxes, results):
            if not len(image_boxes):
                continue
            masks, scores, logits = next(official)
            assert result.masks.dtype == bool and result.masks.shape == (len(image_boxes), *image.shape[:2])
            assert result.logits.shape == (len(image_boxes), 256, 256)
            assert np.abs(result.logits - logits).max() <= 1e-3
            assert np.abs(result.scores - scores).max() <= 1e-4
            assert (result.masks != masks).mean() <= 1e-4
            assert masks.any() and (~masks).any(), "a degenerate case would prove little"


def test_encode_decode_halves_match_refine_with_interleaved_images() -> None:
    model = randomize_(build_hqsam("vit_tiny"), seed=11)
    refiner = BoxRefiner(model, max_prompts=3)
    images, boxes = _images_and_boxes(seed=5)
    images, boxes = [images[0], images[2]], [boxes[0], boxes[2]]
    whole = refiner.refine(images, boxes)

    features = refiner.encode(images)
    # boxes given interleaved across images: each must still use its own image's features
    flat = np.concatenate([boxes[1][:1], boxes[0], boxes[1][1:]])
    index = np.array([1, 0, 0, 0, 1])
    halves = refiner.decode(features, flat, index)
    for a, b in zip(whole, halves):
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_image_without_boxes_is_not_encoded_and_empty_call_works() -> None:
    refiner = BoxRefiner(build_hqsam("vit_tiny"))
    image = np.zeros((40, 60, 3), np.uint8)
    (result,) = refiner.refine([image], [np.zeros((0, 4))])
    assert result.masks.shape == (0, 40, 60) and result.scores.shape == (0,)
    assert refiner.refine([], []) == []
