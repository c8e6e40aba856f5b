"""The contract: our batched BoxRefiner gives the official HQ-SAM predictor's masks, logits and scores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hqsam.hqsam_core import BoxRefiner, build_hqsam
from hqsam.hqsam_core.masks import remove_small_regions
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


def _points_and_masks(images, boxes, seed: int):
    """Per image: 3 points per box (the last a -1 pad for every other box) and a mask prompt."""
    rng = np.random.default_rng(seed)
    points, labels, mask_inputs = [], [], []
    for image, image_boxes in zip(images, boxes):
        h, w = image.shape[:2]
        n = len(image_boxes)
        points.append(np.stack([rng.uniform(0, w, (n, 3)), rng.uniform(0, h, (n, 3))], -1).astype(np.float32))
        image_labels = rng.integers(0, 2, (n, 3))
        image_labels[::2, 2] = -1
        labels.append(image_labels)
        mask_inputs.append(rng.normal(0, 4, (n, 256, 256)).astype(np.float32))
    return points, labels, mask_inputs


@pytest.mark.parametrize(
    ("variant", "images_used"), [("vit_tiny", 3), pytest.param("vit_b", 1, marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("prompt", ["box+points", "box+mask", "box+points+mask"])
def test_point_and_mask_prompts_equal_official_predictor(variant: str, images_used: int, prompt: str) -> None:
    """Points (with -1 padding) and dense mask prompts through our batched decoder give the official
    `predict_torch(point_coords, point_labels, boxes, mask_input)` results, as boxes do; the quality
    columns agree with segment_anything's stability score and SAM's own mask (the official logits
    without the HQ token's share)."""
    from segment_anything.utils.amg import calculate_stability_score

    model = randomize_(build_hqsam(variant), seed=4)
    predictor = _official(variant, model.state_dict())
    refiner = BoxRefiner(model, max_prompts=2)
    images, boxes = _images_and_boxes(seed=3)
    images, boxes = images[:images_used], boxes[:images_used]
    points, labels, mask_inputs = _points_and_masks(images, boxes, seed=8)
    with_points, with_mask = "points" in prompt, "mask" in prompt

    ours = refiner.refine(
        images,
        boxes,
        points=points if with_points else None,
        point_labels=labels if with_points else None,
        mask_inputs=mask_inputs if with_mask else None,
    )
    compared = 0
    with torch.no_grad():
        for image, image_boxes, image_points, image_labels, image_masks, result in zip(
            images, boxes, points, labels, mask_inputs, ours
        ):
            if not len(image_boxes):
                continue
            predictor.set_image(image)
            size = image.shape[:2]
            prompts = {
                "point_coords": predictor.transform.apply_coords_torch(torch.as_tensor(image_points), size)
                if with_points
                else None,
                "point_labels": torch.as_tensor(image_labels) if with_points else None,
                "boxes": predictor.transform.apply_boxes_torch(torch.as_tensor(image_boxes), size),
                "mask_input": torch.as_tensor(image_masks)[:, None] if with_mask else None,
                "multimask_output": False,
            }
            masks, scores, logits = predictor.predict_torch(**prompts)
            upscaled, _, _ = predictor.predict_torch(**prompts, return_logits=True)
            _, _, hq_logits = predictor.predict_torch(**prompts, hq_token_only=True)
            sam_masks = (
                predictor.model.postprocess_masks(
                    logits - hq_logits, predictor.input_size, predictor.original_size
                )[:, 0]
                > predictor.model.mask_threshold
            )
            masks = masks[:, 0].numpy()
            assert np.abs(result.logits - logits[:, 0].numpy()).max() <= 1e-3
            assert np.abs(result.scores - scores[:, 0].numpy()).max() <= 1e-4
            assert (result.masks != masks).mean() <= 1e-4
            assert masks.any() and (~masks).any(), "a degenerate case would prove little"
            stability = calculate_stability_score(upscaled[:, 0], predictor.model.mask_threshold, 1.0)
            np.testing.assert_allclose(result.stability, stability.numpy(), atol=1e-3)
            sam_masks = sam_masks.numpy()
            expected_iou = (sam_masks & masks).sum((1, 2)) / np.maximum((sam_masks | masks).sum((1, 2)), 1)
            np.testing.assert_allclose(result.sam_hq_iou, expected_iou, atol=1e-3)
            assert (expected_iou < 0.999).any(), "SAM's and HQ-SAM's masks should differ somewhere"
            compared += len(image_boxes)
    assert compared >= 2


def test_the_box_alone_differs_from_box_and_points() -> None:
    """The extra prompts reach the decoder (a guard against their being dropped on the way)."""
    model = randomize_(build_hqsam("vit_tiny"), seed=4)
    refiner = BoxRefiner(model)
    images, boxes = _images_and_boxes(seed=3)
    points, labels, mask_inputs = _points_and_masks(images[:1], boxes[:1], seed=8)
    (plain,) = refiner.refine(images[:1], boxes[:1])
    (pointed,) = refiner.refine(images[:1], boxes[:1], points=points, point_labels=labels)
    (masked,) = refiner.refine(images[:1], boxes[:1], mask_inputs=mask_inputs)
    assert np.abs(plain.logits - pointed.logits).max() > 0.1
    assert np.abs(plain.logits - masked.logits).max() > 0.1


def test_prompt_shapes_are_checked() -> None:
    refiner = BoxRefiner(build_hqsam("vit_tiny"))
    image = np.zeros((40, 60, 3), np.uint8)
    box = np.array([[1, 2, 30, 20]], np.float32)
    with pytest.raises(ValueError, match="labels"):
        refiner.refine([image], [box], points=[np.zeros((1, 2, 2))])
    with pytest.raises(ValueError, match="points"):
        refiner.refine([image], [box], points=[np.zeros((2, 2, 2))], point_labels=[np.zeros((2, 2))])
    with pytest.raises(ValueError, match="mask_inputs"):
        refiner.refine([image], [box], mask_inputs=[np.zeros((1, 64, 64))])
    with pytest.raises(ValueError, match="crop_zoom"):
        refiner.refine([image], [box], mask_inputs=[np.zeros((1, 256, 256))], crop_zoom=0.5)


def test_min_region_area_cleans_the_written_masks_as_segment_anything_does() -> None:
    """Holes and islands under the area go, as amg.remove_small_regions removes them (holes first,
    then islands, as SAM's automatic mask generator does); the quality columns see the cleaned mask."""
    from segment_anything.utils.amg import remove_small_regions as amg_remove

    square = np.zeros((1, 30, 30), bool)
    square[0, 5:15, 5:15] = True
    square[0, 8:10, 8:10] = False  # a 4-pixel hole
    square[0, 25, 25] = True  # a 1-pixel island
    expected = np.zeros((30, 30), bool)
    expected[5:15, 5:15] = True
    assert (remove_small_regions(square, 5)[0] == expected).all()
    assert (remove_small_regions(square, 0) == square).all()

    model = randomize_(build_hqsam("vit_tiny"), seed=4)
    refiner = BoxRefiner(model)
    images, boxes = _images_and_boxes(seed=3)
    (plain,) = refiner.refine(images[:1], boxes[:1])
    (cleaned,) = refiner.refine(images[:1], boxes[:1], min_region_area=400)
    for mask, result in zip(plain.masks, cleaned.masks):
        reference, _ = amg_remove(mask, 400, mode="holes")
        reference, _ = amg_remove(reference, 400, mode="islands")
        assert (result == reference).all()
    assert (plain.masks != cleaned.masks).any(), "the random masks have small regions to remove"
    np.testing.assert_array_equal(plain.stability, cleaned.stability)  # a rating of the logits
