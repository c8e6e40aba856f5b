"""`hqsam evaluate`: per-source and overall mIoU / mBIoU, original annotations, COCO mask AP and
Boundary AP. AP is checked against COCOeval itself and against a direct min(IoU, BIoU) matrix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from hqsam.hqsam_core.masks import encode_rle, segmentation_to_mask
from hqsam.hqsam_core.metrics import boundary_iou, mask_iou
from hqsam.hqsam_core.testing.thin_structures import generate_thin_structures
from hqsam.jobs.cli import app
from hqsam.jobs.evaluate import BoundaryCOCOeval, coco_ap
from tests.conftest import shared_fixture


def labelme_coco() -> dict:
    return json.loads((shared_fixture("labelme-voc") / "annotations.json").read_text())


def gt_masks(coco: dict) -> dict[int, np.ndarray]:
    images = {i["id"]: i for i in coco["images"]}
    return {
        a["id"]: segmentation_to_mask(
            a["segmentation"], images[a["image_id"]]["height"], images[a["image_id"]]["width"]
        )
        for a in coco["annotations"]
    }


def predictions_from(coco: dict, masks: dict[int, np.ndarray]) -> list[dict]:
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "segmentation": encode_rle(masks[a["id"]]),
            "score": 1.0 - 0.01 * k,
            "annotation_id": a["id"],
        }
        for k, a in enumerate(coco["annotations"])
    ]


def test_ap_of_the_ground_truth_itself_is_one() -> None:
    coco = labelme_coco()
    result = coco_ap(coco, predictions_from(coco, gt_masks(coco)))
    for key in ("mask_ap", "mask_ap50", "mask_ap75", "boundary_ap", "boundary_ap50", "boundary_ap75"):
        assert result[key] == pytest.approx(1.0), key


def test_boundary_ap_is_stricter_than_mask_ap_for_shifted_masks() -> None:
    coco = labelme_coco()
    shifted = {k: np.roll(m, 4, axis=1) for k, m in gt_masks(coco).items()}
    result = coco_ap(coco, predictions_from(coco, shifted))
    assert 0.0 <= result["boundary_ap"] < result["mask_ap"] <= 1.0
    # the mask half is COCOeval unchanged (labelme's annotation ids start at 0, which COCOeval
    # takes for "unmatched": the reference gets ids from 1, as coco_ap gives them)
    reference = COCO()
    reference.dataset = labelme_coco()
    for annotation in reference.dataset["annotations"]:
        annotation["id"] += 1
    reference.createIndex()
    detections = reference.loadRes(
        [
            {k: p[k] for k in ("image_id", "category_id", "segmentation", "score")}
            for p in predictions_from(coco, shifted)
        ]
    )
    evaluator = COCOeval(reference, detections, "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert result["mask_ap"] == pytest.approx(evaluator.stats[0])


def test_boundary_evaluator_scores_pairs_by_min_of_mask_and_boundary_iou() -> None:
    height, width = 40, 60
    a = np.zeros((height, width), bool)
    a[5:30, 5:30] = True
    b = np.zeros((height, width), bool)
    b[10:35, 20:50] = True
    crowd = np.zeros((height, width), bool)
    crowd[0:10, 40:60] = True
    data = {
        "images": [{"id": 1, "width": width, "height": height}],
        "categories": [{"id": 1}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": 1, "segmentation": encode_rle(m), "iscrowd": c}
            | {
                "area": int(m.sum()),
                "bbox": list(mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))),
            }
            for i, (m, c) in enumerate([(a, 0), (b, 0), (crowd, 1)])
        ],
    }
    p1 = np.roll(a, 2, axis=0)
    p2 = b.copy()
    p2[20:25, 25:30] = False  # a hole: the boundary suffers more than the mask
    ground_truth = COCO()
    ground_truth.dataset = data
    ground_truth.createIndex()
    detections = ground_truth.loadRes(
        [
            {"image_id": 1, "category_id": 1, "segmentation": encode_rle(p), "score": s}
            for p, s in ((p1, 0.9), (p2, 0.8))
        ]
    )
    evaluator = BoundaryCOCOeval(ground_truth, detections, "segm")
    evaluator.params.imgIds = [1]
    evaluator._prepare()
    matrix = evaluator.computeIoU(1, 1)
    for i, prediction in enumerate((p1, p2)):
        for j, (truth, is_crowd) in enumerate(((a, 0), (b, 0), (crowd, 1))):
            if is_crowd:  # crowd regions keep COCO's crowd IoU: intersection over the prediction
                want = (prediction & truth).sum() / prediction.sum()
            else:
                overlap = mask_iou(prediction, truth)
                want = min(overlap, boundary_iou(prediction, truth)) if overlap > 0 else 0.0
            assert matrix[i, j] == pytest.approx(want, abs=1e-9), (i, j)
    assert matrix[1, 1] < mask_iou(p2, b)


def test_evaluate_command_on_labelme_coco_and_a_folder_pair(tiny_checkpoint: Path, tmp_path: Path) -> None:
    labelme = shared_fixture("labelme-voc")
    pair = tmp_path / "pair"
    for folder in ("im", "gt", "orig"):
        (pair / folder).mkdir(parents=True)
    expected_original = []
    for i, (image, mask) in enumerate(generate_thin_structures(3, seed=9, size=96)):
        Image.fromarray(image).save(pair / "im" / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(pair / "gt" / f"{i}.png")
        coarse = mask | np.roll(mask, 1, axis=0) | np.roll(mask, 1, axis=1)  # a sloppier annotation
        Image.fromarray(coarse.astype(np.uint8) * 255).save(pair / "orig" / f"{i}.png")
        expected_original.append((mask_iou(coarse, mask), boundary_iou(coarse, mask)))
    report_path = tmp_path / "report.json"
    args = [
        "evaluate",
        "--data",
        str(labelme / "annotations.json"),
        "--data",
        f"{pair}::original={pair / 'orig'}",
    ]
    args += ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--out", str(report_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "HQ mIoU" in result.output and "bound. AP" in result.output and "overall" in result.output

    report = json.loads(report_path.read_text())
    assert report == json.loads(json.dumps(report))
    coco_entry = report["sources"][str(labelme / "annotations.json")]
    pair_entry = report["sources"][f"{pair}::original={pair / 'orig'}"]
    assert coco_entry["samples"] == 12 and pair_entry["samples"] == 3 and report["overall"]["samples"] == 15
    base = {"sam_miou", "sam_mbiou", "hq_miou", "hq_mbiou"}
    assert base <= coco_entry.keys() and not {"original_miou", "original_mbiou"} & coco_entry.keys()
    for key in ("mask_ap", "mask_ap50", "mask_ap75", "boundary_ap", "boundary_ap50", "boundary_ap75"):
        assert 0.0 <= coco_entry[key] <= 1.0, key
    assert coco_entry["boundary_ap"] <= coco_entry["mask_ap"] + 1e-9
    assert pair_entry["original_miou"] == pytest.approx(np.mean([iou for iou, _ in expected_original]))
    assert pair_entry["original_mbiou"] == pytest.approx(np.mean([biou for _, biou in expected_original]))
    assert "mask_ap" not in pair_entry
    for entry in (coco_entry, pair_entry, report["overall"]):
        for key in base:
            assert 0.0 <= entry[key] <= 1.0
    # overall pools samples: a sample-weighted mean of the sources
    for key in base:
        pooled = (12 * coco_entry[key] + 3 * pair_entry[key]) / 15
        assert report["overall"][key] == pytest.approx(pooled)
    assert report["overall"]["original_miou"] == pytest.approx(pair_entry["original_miou"])
