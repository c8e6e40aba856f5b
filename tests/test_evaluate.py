"""`hqsam evaluate`: per-source and overall mIoU / mBIoU, original annotations, COCO mask AP and
Boundary AP. AP is checked against COCOeval itself and against a direct min(IoU, BIoU) matrix; the
per-sample loop and the report's parts are checked without the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from hqsam.hqsam_core import BoxRefiner, build_hqsam
from hqsam.hqsam_core.coco_eval import BoundaryCOCOeval, coco_ap
from hqsam.hqsam_core.masks import decode_rle, encode_rle, segmentation_to_mask
from hqsam.hqsam_core.metrics import boundary_iou, mask_iou
from hqsam.hqsam_core.testing.random_weights import randomize_
from hqsam.hqsam_core.testing.thin_structures import generate_thin_structures
from hqsam.jobs.cli import app
from hqsam.pipeline.evaluate_run import (
    EvaluateConfig,
    SourceEvaluation,
    format_table,
    mean_of_sources,
    pooled_summary,
    protocol,
)
from hqsam.pipeline.evaluate_samples import evaluate_rows, summarize_by_source
from hqsam.pipeline.train_sources import parse_source, source_rows
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


@pytest.mark.slow
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


# --- the per-sample loop and the report, without the command line ------------------------------------


@pytest.fixture(scope="module")
def fast_refiner() -> BoxRefiner:
    """A random vit_tiny whose image encoder returns fixed random features: the loop around the model
    is under test here, and the real encoder takes seconds per image on a CPU."""
    model = randomize_(build_hqsam("vit_tiny"), seed=5)
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64, generator=generator)
    interm = torch.randn(1, 32, 256, 256, generator=generator)
    model.encode = lambda images: (
        embedding.expand(len(images), -1, -1, -1),
        interm.expand(len(images), -1, -1, -1),
    )
    return BoxRefiner(model, "cpu")


def thin_coco(root: Path) -> tuple[Path, list[np.ndarray]]:
    """root/coco.json over 3 generated thin-structure images; annotation 3 has an empty mask and
    annotation 4's image is missing, so two of four annotations load. Returns the file and GTs."""
    coco: dict = {"images": [], "annotations": [], "categories": [{"id": 7, "name": "wire"}]}
    masks = []
    for i, (image, mask) in enumerate(generate_thin_structures(3, seed=4, size=64), start=1):
        if i < 3:
            Image.fromarray(image).save(root / f"{i}.png")
        masks.append(mask)
        coco["images"].append({"id": i, "file_name": f"{i}.png", "height": 64, "width": 64})
    empty = np.zeros((64, 64), bool)
    for annotation_id, (image_id, mask) in enumerate(
        [(1, masks[0]), (2, masks[1]), (2, empty), (3, masks[2])], 1
    ):
        coco["annotations"].append(
            {
                "id": annotation_id,
                "image_id": image_id,
                "category_id": 7,
                "segmentation": encode_rle(mask),
                "bbox": [0, 0, 64, 64],
                "iscrowd": 0,
            }
        )
    path = root / "coco.json"
    path.write_text(json.dumps(coco))
    return path, masks[:2]


def test_evaluate_rows_scores_the_loadable_samples_and_returns_their_masks(
    fast_refiner: BoxRefiner, tmp_path: Path
) -> None:
    path, gts = thin_coco(tmp_path)
    rows = source_rows(parse_source(str(path))).to_pylist()
    assert len(rows) == 4
    predictions: list = []
    with torch.inference_mode():  # two batches, one loadable sample in each
        per_sample, sources, skipped = evaluate_rows(fast_refiner, rows, 2, predictions=predictions)
    assert skipped == 2 and sources == [rows[0]["source"], rows[1]["source"]]
    keys = {"sam_iou", "sam_biou", "hq_iou", "hq_biou", "original_iou", "original_biou"}
    assert set(per_sample) == keys and all(len(values) == 2 for values in per_sample.values())
    assert per_sample["original_iou"] == [None, None]  # no original annotation given
    assert [(p["image_id"], p["annotation_id"], p["category_id"]) for p in predictions] == [
        (1, 1, 7),
        (2, 2, 7),
    ]
    for k, (prediction, gt) in enumerate(zip(predictions, gts)):
        # the detections are the very HQ masks that were scored
        mask = decode_rle(prediction["segmentation"])
        assert mask.shape == gt.shape
        assert per_sample["hq_iou"][k] == pytest.approx(mask_iou(mask, gt))
        assert per_sample["hq_biou"][k] == pytest.approx(boundary_iou(mask, gt))
        assert isinstance(prediction["score"], float) and math.isfinite(prediction["score"])


def test_evaluate_rows_of_unloadable_rows_only(fast_refiner: BoxRefiner, tmp_path: Path) -> None:
    path, _ = thin_coco(tmp_path)
    rows = source_rows(parse_source(str(path))).to_pylist()[2:]
    predictions: list = []
    assert evaluate_rows(fast_refiner, rows, 4, predictions=predictions) == ({}, [], 2)
    assert predictions == []


def test_summaries_pool_samples_and_average_sources() -> None:
    first = {"sam_iou": [0.2, 0.4], "sam_biou": [0.1, 0.3], "original_iou": [None, 0.5]}
    second = {"sam_iou": [1.0], "sam_biou": [0.9], "original_iou": [None]}
    evaluated = [
        SourceEvaluation(
            "a",
            {**summarize_by_source(first, ["a", "a"])["overall"], "samples": 2, "skipped": 1},
            first,
            ["a", "a"],
        ),
        SourceEvaluation(
            "b", {**summarize_by_source(second, ["b"])["overall"], "samples": 1, "skipped": 0}, second, ["b"]
        ),
        SourceEvaluation("c", {"samples": 0, "skipped": 3}, {}, []),
    ]
    overall = pooled_summary(evaluated)
    assert overall == {
        "sam_miou": pytest.approx((0.2 + 0.4 + 1.0) / 3),
        "sam_mbiou": pytest.approx((0.1 + 0.3 + 0.9) / 3),
        "original_miou": pytest.approx(0.5),
        "samples": 3,
        "skipped": 4,
    }
    means = mean_of_sources([e.entry for e in evaluated])
    assert means == {
        "sam_miou": pytest.approx((0.3 + 1.0) / 2),
        "sam_mbiou": pytest.approx((0.2 + 0.9) / 2),
        "original_miou": pytest.approx(0.5),
    }


def test_protocol_names_the_resize_and_the_hq_output() -> None:
    square = protocol(EvaluateConfig(data=[], out="r.json"))
    assert "squashed to 1024x1024" in square and "HQ-only output" in square
    longest = protocol(EvaluateConfig(data=[], out="r.json", resize="longest", hq_token_only=False))
    assert "longest side resized to 1024" in longest and "SAM + HQ output" in longest


def test_format_table() -> None:
    long_name = "s3://bucket/" + "x" * 60 + "/annotations.json"
    report = {
        "sources": {
            "pairs": {"samples": 3, "sam_miou": 0.5, "hq_miou": 0.75, "original_miou": float("nan")},
            long_name: {"samples": 2, "sam_miou": 0.25, "hq_miou": 0.5, "mask_ap": 0.123},
        },
        "overall": {"samples": 5, "sam_miou": 0.4, "hq_miou": 0.65},
    }
    lines = format_table(report).splitlines()
    assert len(lines) == 5 and set(lines[1]) == {"-"} and len(lines[1]) == len(lines[0])
    assert lines[0].split() == ["source", "n", "SAM", "mIoU", "HQ", "mIoU", "orig", "mIoU", "mask", "AP"]
    assert lines[2].split() == ["pairs", "3", "50.0", "75.0", "-", "-"]
    assert lines[3].split() == ["..." + long_name[-37:], "2", "25.0", "50.0", "-", "12.3"]
    assert lines[4].split() == ["overall", "5", "40.0", "65.0", "-", "-"]
    assert len({len(line) for line in lines}) == 1  # fixed width
