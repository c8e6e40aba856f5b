"""The evaluation protocol: metric values, the SAM = (SAM + HQ) - HQ identity, summaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from segment_anything.modeling import MaskDecoder, TwoWayTransformer

from hqsam.hqsam_core import BoxRefiner, build_hqsam
from hqsam.hqsam_core.checkpoint import is_hq_key
from hqsam.hqsam_core.evaluation import (
    SampleScores,
    _squash,
    _squashed_box,
    evaluate_batch,
    evaluate_batch_with_masks,
    sam_low_res_logits,
    score_masks,
    summarize,
)
from hqsam.hqsam_core.masks import tight_box_inclusive
from hqsam.hqsam_core.metrics import boundary_iou_batch, mask_iou_batch
from hqsam.hqsam_core.testing.random_weights import randomize_


def _rect(shape, top, bottom, left, right) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def _ring(shape, top, bottom, left, right, d) -> np.ndarray:
    """A rectangle's boundary band of width d, written out by hand."""
    return _rect(shape, top, bottom, left, right) & ~_rect(shape, top + d, bottom - d, left + d, right - d)


def test_scores_on_crafted_masks_match_pycocotools_and_hand_computation():
    shape = (64, 64)  # diagonal 90.5 -> d = round(1.81) = 2
    gt = _rect(shape, 10, 30, 10, 30)
    pred = _rect(shape, 10, 30, 15, 35)
    (score,) = score_masks([pred], [gt])
    assert isinstance(score, SampleScores)
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in (pred, gt)]
    assert score.iou == pytest.approx(float(mask_utils.iou([rles[0]], [rles[1]], [0])[0, 0]))
    assert score.iou == pytest.approx(300 / 500)
    a, b = _ring(shape, 10, 30, 15, 35, 2), _ring(shape, 10, 30, 10, 30, 2)
    assert score.boundary_iou == pytest.approx((a & b).sum() / (a | b).sum())
    # uint8 masks are 0/255 images (foreground > 128) or 0/1; two empty masks match perfectly
    (as_uint8,) = score_masks([pred.astype(np.uint8) * 255], [gt.astype(np.uint8) * 200])
    assert as_uint8 == score
    (as_01,) = score_masks([pred.astype(np.uint8)], [gt.astype(np.uint8)])  # pycocotools' annToMask style
    assert as_01 == score
    (empty,) = score_masks([np.zeros(shape, bool)], [np.zeros(shape, bool)])
    assert empty == SampleScores(1.0, 1.0)


def test_summarize_means_and_names():
    summary = summarize(
        {
            "sam_iou": [0.5, 1.0],
            "sam_biou": [0.25, 0.75],
            "hq_iou": [1.0, 1.0],
            "hq_biou": [0.5, 0.0],
            "original_iou": [0.2, None],
            "original_biou": [None, None],
        }
    )
    assert summary == {
        "sam_miou": 0.75,
        "sam_mbiou": 0.5,
        "hq_miou": 1.0,
        "hq_mbiou": 0.25,
        "original_miou": pytest.approx(0.2),
    }


def test_square_resize_helpers_follow_the_official_loader():
    image = np.zeros((100, 50, 3), dtype=np.uint8)
    image[:, 25:] = 200
    squashed = _squash(image, 1024)
    assert squashed.shape == (1024, 1024, 3) and squashed.dtype == np.uint8
    assert (squashed[:, :500] == 0).all() and (squashed[:, 530:] == 200).all()
    gt = _rect((100, 50), 10, 20, 5, 30)
    # output pixel r samples the source at (r + .5) / s - .5 (s = 10.24 for rows, 20.48 for columns);
    # > 128 of 255 needs that within 0.498 px of the GT's pixels: rows 102..204, columns 102..613
    assert _squashed_box(gt, 1024).tolist() == [102, 102, 613, 204]
    assert tight_box_inclusive(gt).tolist() == [5, 10, 29, 19]


@pytest.fixture(scope="module")
def tiny_model():
    return randomize_(build_hqsam("vit_tiny"), seed=33)


def _plain_sam_decoder(model) -> MaskDecoder:
    """segment_anything's own decoder with the model's SAM weights: the independent SAM-only path."""
    decoder = MaskDecoder(
        transformer_dim=256,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    state = {k: v for k, v in model.mask_decoder.state_dict().items() if not is_hq_key(f"mask_decoder.{k}")}
    decoder.load_state_dict(state, strict=True)
    return decoder.eval()


@pytest.mark.slow
def test_evaluate_batch_matches_independent_sam_and_hq_masks(tiny_model, monkeypatch):
    model = tiny_model
    real_encode, cache = model.encode, {}

    def encode(images):  # the encoder is the slow part on CPU: run it once per batch
        key = images.cpu().numpy().tobytes()
        if key not in cache:
            cache[key] = real_encode(images)
        return cache[key]

    monkeypatch.setattr(model, "encode", encode)
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (96, 128, 3), dtype=np.uint8),
        rng.integers(0, 256, (120, 80, 3), dtype=np.uint8),
    ]
    gts = [_rect((96, 128), 20, 60, 30, 100), _rect((120, 80), 10, 100, 20, 40)]
    for image, gt in zip(images, gts):
        image[gt] = 250
    originals = [_rect((96, 128), 20, 60, 30, 90), None]

    model.train()
    result = evaluate_batch(model, images, gts, originals, resize="longest")
    assert model.training  # the caller's mode is restored
    assert set(result) == {"sam_iou", "sam_biou", "hq_iou", "hq_biou", "original_iou", "original_biou"}
    assert result["original_iou"] == [pytest.approx(60 / 70), None]
    assert result["original_biou"][1] is None

    # Independent computation: HQ-only masks from BoxRefiner, SAM masks from segment_anything's decoder.
    refiner = BoxRefiner(model)
    features = refiner.encode(images)
    boxes = np.stack([tight_box_inclusive(gt) for gt in gts])
    hq = refiner.decode(features, boxes, np.arange(2), hq_token_only=True)
    decoder = _plain_sam_decoder(model)
    for i, gt in enumerate(gts):
        box = refiner.transform.apply_boxes_torch(
            torch.from_numpy(boxes[i : i + 1]), features.original_sizes[i]
        )
        with torch.no_grad():
            sparse, dense = model.prompt_encoder(points=None, boxes=box, masks=None)
            low_res, _ = decoder(
                features.embeddings[i : i + 1], model.prompt_encoder.get_dense_pe(), sparse, dense, False
            )
            sam = (
                model.postprocess_masks(low_res, features.input_sizes[i], features.original_sizes[i])[0, 0]
                > 0
            )
        for name, mask in (("sam", sam.numpy()), ("hq", hq[i].masks[0])):
            expected_iou = mask_iou_batch(mask[None], gt[None])[0]
            expected_biou = boundary_iou_batch(mask[None], gt[None])[0]
            assert result[f"{name}_iou"][i] == pytest.approx(expected_iou, abs=1e-3), name
            assert result[f"{name}_biou"][i] == pytest.approx(expected_biou, abs=1e-3), name
    # the SAM and HQ masks of a random head differ, so the check above tells them apart
    assert result["sam_iou"] != result["hq_iou"]


def test_square_resize_with_combined_logits(tiny_model, monkeypatch):
    """resize="square", hq_token_only=False: masks are the 256x256 logits of the squashed image
    resized straight to the GT size; the HQ mask is SAM + HQ logits."""
    model = tiny_model
    refiner = BoxRefiner(model)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)
    gt = _rect((90, 150), 30, 70, 40, 120)
    # The protocol, not the encoder, is under test: skip the slow encoder with fixed random features.
    generator = torch.Generator().manual_seed(0)
    fake = (
        torch.randn(1, 256, 64, 64, generator=generator),
        torch.randn(1, 32, 256, 256, generator=generator),
    )
    monkeypatch.setattr(model, "encode", lambda images: fake)
    result = evaluate_batch(refiner, [image], [gt], hq_token_only=False, resize="square")

    features = refiner.encode([_squash(image, 1024)])
    box = _squashed_box(gt, 1024)[None]
    combined = torch.from_numpy(refiner.decode(features, box, [0], hq_token_only=False)[0].logits[:, None])
    sam = sam_low_res_logits(refiner, features, 0, box)
    for name, logits in (("hq", combined), ("sam", sam)):
        mask = (F.interpolate(logits, size=gt.shape, mode="bilinear", align_corners=False)[0] > 0).numpy()
        assert result[f"{name}_iou"] == [pytest.approx(mask_iou_batch(mask, gt[None])[0])], name
        assert result[f"{name}_biou"] == [pytest.approx(boundary_iou_batch(mask, gt[None])[0])], name


def test_evaluate_batch_with_masks_returns_the_scored_hq_masks_and_scores(tiny_model, monkeypatch):
    """What COCO AP needs comes back with the scores: the HQ masks that were scored and the decoder's
    predicted IoU of each, as a direct decode of the same boxes gives it."""
    model = tiny_model
    refiner = BoxRefiner(model)
    generator = torch.Generator().manual_seed(2)
    fake = (
        torch.randn(1, 256, 64, 64, generator=generator),
        torch.randn(1, 32, 256, 256, generator=generator),
    )
    # The encoder is not under test (and slow on a CPU): fixed random features for every image.
    monkeypatch.setattr(
        model, "encode", lambda images: tuple(f.expand(len(images), -1, -1, -1) for f in fake)
    )
    rng = np.random.default_rng(3)
    images = [
        rng.integers(0, 256, (90, 150, 3), dtype=np.uint8),
        rng.integers(0, 256, (60, 40, 3), dtype=np.uint8),
    ]
    gts = [_rect((90, 150), 30, 70, 40, 120), _rect((60, 40), 5, 50, 10, 30)]
    evaluation = evaluate_batch_with_masks(refiner, images, gts, hq_token_only=True, resize="square")

    assert set(evaluation.metrics) == {"sam_iou", "sam_biou", "hq_iou", "hq_biou"}
    assert len(evaluation.hq_masks) == len(evaluation.hq_scores) == 2
    for i, (mask, gt) in enumerate(zip(evaluation.hq_masks, gts)):
        assert mask.shape == gt.shape and mask.dtype == bool
        assert evaluation.metrics["hq_iou"][i] == pytest.approx(mask_iou_batch(mask[None], gt[None])[0])
        assert evaluation.metrics["hq_biou"][i] == pytest.approx(boundary_iou_batch(mask[None], gt[None])[0])
    features = refiner.encode([_squash(image, 1024) for image in images])
    boxes = np.stack([_squashed_box(gt, 1024) for gt in gts])
    decoded = refiner.decode(features, boxes, np.arange(2), hq_token_only=True)
    assert evaluation.hq_scores == [pytest.approx(float(d.scores[0]), abs=1e-5) for d in decoded]
    assert all(isinstance(score, float) for score in evaluation.hq_scores)

    empty = evaluate_batch_with_masks(refiner, [], [], [])
    assert empty.hq_masks == [] and empty.hq_scores == []
    assert empty.metrics == {
        key: [] for key in ("sam_iou", "sam_biou", "hq_iou", "hq_biou", "original_iou", "original_biou")
    }
