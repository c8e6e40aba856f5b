"""Each refine stage on its own, without Ray, in seconds: its declared fields, its work, its statuses.

The rows are the ones schemas/refine_rows.py declares; expected values come from PIL, pycocotools
and a bare BoxRefiner with the same weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from hqsam.hqsam_core import BoxRefiner, build_hqsam, save_model
from hqsam.hqsam_core.masks import encode_rle
from hqsam.hqsam_core.metrics import boundary_iou_batch
from hqsam.hqsam_core.testing.random_weights import randomize_
from hqsam.pipeline.decode_images import DecodeImages
from hqsam.pipeline.encode_masks import EncodeMasks
from hqsam.pipeline.judge_rows import JudgeRows
from hqsam.pipeline.manifest import read_manifest
from hqsam.pipeline.read_images import ReadImages
from hqsam.pipeline.refine_masks import RefineMasks
from hqsam.pipeline.refine_pipeline import RefineSettings, refine_stages
from hqsam.pipeline.stage import Stage, run_local, to_batch, to_rows
from hqsam.pipeline.write_parquet import WriteParquetParts
from hqsam.schemas.refine_rows import (
    IMAGE_DECODED,
    IMAGE_ENCODED,
    IMAGE_JUDGED,
    IMAGE_READ,
    IMAGE_REFINED,
    IMAGE_TASK,
    IMAGE_WRITTEN,
)
from hqsam.schemas.refined import REFINED_ANNOTATION
from hqsam.schemas.status import Status
from tests.conftest import ROOT

W, H = 64, 48
SHAPES = ROOT / "examples" / "shapes" / "annotations.json"
# The row before and after each stage of the chain, in order.
ROWS = [IMAGE_TASK, IMAGE_READ, IMAGE_DECODED, IMAGE_REFINED, IMAGE_ENCODED, IMAGE_JUDGED, IMAGE_WRITTEN]


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> RefineSettings:
    """Random vit_tiny weights whose masks on the small test images are neither empty nor full."""
    path = tmp_path_factory.mktemp("weights") / "tiny_seed28.pth"
    with torch.random.fork_rng():
        torch.manual_seed(28)  # the prompt encoder's random Fourier features are drawn at build
        save_model(randomize_(build_hqsam("vit_tiny"), seed=28), str(path))
    return RefineSettings("vit_tiny", str(path), None, "cpu", batch_size=2)


@pytest.fixture(scope="module")
def refine(settings: RefineSettings) -> RefineMasks:
    stage = RefineMasks(settings)
    stage.setup()
    return stage


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """Blocky random RGB pixels: structure for the model to segment."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(base, np.ones((8, 8, 1), np.uint8))[:height, :width])


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def task(image_id: int = 1, uri: str | None = "unused.png", boxes=((4, 4, 20, 16),), **fields) -> dict:
    """An IMAGE_TASK row with one annotation per box."""
    count = len(boxes)
    row = {
        "image_id": image_id,
        "image_uri": uri,
        "file_name": uri and uri.rsplit("/", 1)[-1],
        "width": W,
        "height": H,
        "ann_ids": [10 * image_id + k for k in range(count)],
        "ann_indices": [100 * image_id + k for k in range(count)],
        "category_ids": [1] * count,
        "bboxes": [list(map(float, box)) for box in boxes],
        "iscrowd": [0] * count,
        "segmentations": [""] * count,
    }
    row.update(fields)
    assert set(row) == set(IMAGE_TASK.names)
    return row


def read_row(data: bytes, **fields) -> dict:
    """An IMAGE_READ row whose image was read as `data`."""
    return task(**fields) | {"image_bytes": data, "image_status": Status.OK, "image_error": ""}


def decode(row: dict, box_source: str = "bbox") -> dict:
    (row,) = DecodeImages(box_source).process([row])
    assert set(row) == set(IMAGE_DECODED.names)
    return row


def square(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def rle_mask(counts: str, height: int = H, width: int = W) -> np.ndarray:
    return mask_utils.decode({"size": [height, width], "counts": counts.encode()}).astype(bool)


def coco_iou(a: np.ndarray, b: np.ndarray) -> float:
    encode = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in (a, b)]
    return float(mask_utils.iou([encode[0]], [encode[1]], [0])[0, 0])


# ---------------------------------------------------------------- declarations


def test_every_stage_declares_the_rows_of_schemas_refine_rows(settings, tmp_path) -> None:
    stages = refine_stages(str(tmp_path), settings)
    assert [type(stage) for stage in stages] == [
        ReadImages,
        DecodeImages,
        RefineMasks,
        EncodeMasks,
        JudgeRows,
        WriteParquetParts,
    ]
    for stage, before, after in zip(stages, ROWS, ROWS[1:]):
        assert set(stage.reads) <= set(before.names), stage.name
        assert set(stage.drops) <= set(before.names), stage.name
        assert not set(stage.adds) & set(before.names), stage.name
        kept = [name for name in before.names if name not in stage.drops]
        assert kept + list(stage.adds) == after.names, stage.name
    refine_options = stages[2].ray_options()
    assert stages[2].on_actor and stages[2].batch_size == settings.batch_size
    assert refine_options["num_gpus"] == 0 and refine_options["memory"] == 2 * 2**30
    assert refine_options["compute"].max_size == settings.max_actors
    assert stages[5].batch_size == settings.images_per_file
    assert [stage.batch_size for stage in (stages[0], stages[1], stages[3], stages[4])] == [None] * 4


# ---------------------------------------------------------------- ReadImages


def test_read_images_reads_bytes_or_marks_the_image_missing(tmp_path) -> None:
    (tmp_path / "a.png").write_bytes(b"some bytes")
    (tmp_path / "folder.png").mkdir()
    rows = [
        task(1, str(tmp_path / "a.png")),
        task(2, str(tmp_path / "absent.png")),
        task(3, None),
        task(4, str(tmp_path / "folder.png")),
    ]
    ok, absent, unrecorded, folder = ReadImages().process(rows)
    for row in (ok, absent, unrecorded, folder):
        assert set(row) == set(IMAGE_READ.names)
    assert (ok["image_bytes"], ok["image_status"], ok["image_error"]) == (b"some bytes", Status.OK, "")
    for row in (absent, unrecorded, folder):
        assert row["image_bytes"] == b"" and row["image_status"] == Status.IMAGE_MISSING
        assert row["image_error"] and "\n" not in row["image_error"]
    assert "absent.png" in absent["image_error"] and "image_id 3" in unrecorded["image_error"]


# ---------------------------------------------------------------- DecodeImages


def test_decode_images_unreadable_and_size_mismatch_fail_every_annotation() -> None:
    boxes = ((4, 4, 20, 16), (1, 1, 5, 5))
    for data in (b"", b"this is text, not an image", png(texture(H, W, 1))[:200]):
        row = decode(read_row(data, boxes=boxes))
        assert row["statuses"] == [Status.IMAGE_UNREADABLE] * 2
        assert row["errors"][0] and row["errors"][0] == row["errors"][1] and "\n" not in row["errors"][0]
        assert row["pixels"].shape == (0, 0, 3) and np.isnan(row["prompts"]).all()

    row = decode(read_row(png(texture(H, W, 1)), boxes=boxes, width=60, height=40))
    assert row["statuses"] == [Status.IMAGE_SIZE_MISMATCH] * 2
    assert "64x48" in row["errors"][0] and "60x40" in row["errors"][0]

    missing = task(uri=None, boxes=boxes) | {
        "image_bytes": b"",
        "image_status": Status.IMAGE_MISSING,
        "image_error": "no image record for image_id 1",
    }
    row = decode(missing)
    assert (
        row["statuses"] == [Status.IMAGE_MISSING] * 2
        and row["errors"] == ["no image record for image_id 1"] * 2
    )


def test_decode_images_turns_each_annotation_into_a_prompt_or_a_status() -> None:
    pixels = texture(H, W, 2)
    boxes = [
        (4, 4, 20, 16),  # ok
        (40, 30, 40, 30),  # partly outside: clipped
        (math.nan, 5, 10, 10),  # not finite
        (10, 10, 0, 5),  # zero width
        (10, 10, -5, 5),  # negative width
        (100, 100, 10, 10),  # entirely outside
        (8, 6, 30, 20),  # crowd
    ]
    row = read_row(png(pixels), boxes=boxes, iscrowd=[0, 0, 0, 0, 0, 0, 1])
    row["bboxes"].append([])  # an annotation without a 4-number bbox
    row["ann_ids"].append(99)
    row["ann_indices"].append(199)
    row["iscrowd"].append(0)
    row["category_ids"].append(1)
    row["segmentations"].append("")
    row = decode(row)

    np.testing.assert_array_equal(row["pixels"], pixels)
    assert (row["height"], row["width"]) == (H, W)
    pending, invalid = Status.PENDING, Status.INVALID_BOX
    assert row["statuses"] == [
        pending,
        pending,
        invalid,
        invalid,
        invalid,
        invalid,
        Status.CROWD_SKIPPED,
        invalid,
    ]
    assert row["errors"][:2] == ["", ""] and all(row["errors"][2:])
    assert "iscrowd" in row["errors"][6] and "outside" in row["errors"][5]
    np.testing.assert_array_equal(row["prompts"][0], [4, 4, 24, 20])
    np.testing.assert_array_equal(row["prompts"][1], [40, 30, W, H])  # clipped to the image
    assert np.isnan(row["prompts"][2:]).all()


def test_decode_images_box_source_segmentation_prompts_with_the_masks_tight_box() -> None:
    triangle = json.dumps([[6.0, 4.0, 40.0, 10.0, 20.0, 36.0]])
    empty = json.dumps({"size": [H, W], "counts": encode_rle(np.zeros((H, W), bool))["counts"]})
    row = read_row(
        png(texture(H, W, 3)),
        boxes=((20, 20, 30, 20), (1, 1, 5, 5), (1, 1, 5, 5)),
        segmentations=[triangle, empty, "not json"],
    )
    row = decode(row, "segmentation")
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(json.loads(triangle), H, W))).astype(
        bool
    )
    ys, xs = np.nonzero(mask)
    np.testing.assert_array_equal(row["prompts"][0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert row["statuses"] == [Status.PENDING, Status.INVALID_BOX, Status.INVALID_BOX]
    assert "empty" in row["errors"][1] and "segmentation" in row["errors"][2]
    with pytest.raises(ValueError, match="box_source"):
        DecodeImages("mask")


# ---------------------------------------------------------------- RefineMasks


def test_refine_masks_refines_pending_boxes_and_fails_only_the_image_that_raises(refine, settings) -> None:
    good = decode(read_row(png(texture(H, W, 4)), boxes=((4, 4, 30, 20), (8, 6, 30, 20), (200, 1, 5, 5))))
    assert good["statuses"] == [Status.PENDING, Status.PENDING, Status.INVALID_BOX]
    # 1 pixel high: too thin for the model's resize, so refining it raises
    thin = decode(
        read_row(png(texture(1, 3000, 5)), image_id=2, boxes=((0, 0, 3000, 1),), width=3000, height=1)
    )
    crowd = decode(read_row(png(texture(H, W, 6)), image_id=3, iscrowd=[1]))
    assert good["statuses"][:2] == [Status.PENDING] * 2 and thin["statuses"] == [Status.PENDING]
    pixels, prompts = good["pixels"], good["prompts"][:2].astype(np.float32)

    # Through a numpy batch and back, as the stage gets its rows on a Ray actor.
    rows = to_rows(to_batch(refine.process(to_rows(to_batch([good, thin, crowd])))))
    assert [set(row) for row in rows] == [set(IMAGE_REFINED.names)] * 3
    refined, failed, skipped = rows

    bare = BoxRefiner(build_hqsam("vit_tiny", settings.checkpoint), "cpu")
    (expected,) = bare.refine([pixels], [prompts])
    assert list(refined["statuses"]) == [Status.OK, Status.OK, Status.INVALID_BOX]
    assert list(refined["errors"])[:2] == ["", ""]
    np.testing.assert_array_equal(refined["packed_masks"], expected.packed_masks)
    assert all(mask.any() and not mask.all() for mask in expected.masks)
    np.testing.assert_allclose(refined["scores"][:2], expected.scores, atol=1e-6)
    assert math.isnan(refined["scores"][2])

    assert list(failed["statuses"]) == [Status.INFERENCE_FAILED]
    assert failed["errors"][0] and "\n" not in failed["errors"][0]
    assert len(failed["packed_masks"]) == 0 and math.isnan(failed["scores"][0])
    assert list(skipped["statuses"]) == [Status.CROWD_SKIPPED] and len(skipped["packed_masks"]) == 0


@pytest.mark.parametrize("prompt", ["box+points", "box+mask"])
def test_refine_masks_guides_with_the_original_and_says_where_it_had_none(settings, prompt) -> None:
    """The stage hands the annotations' own masks and positions to hqsam_core.guided, which is
    tested against the refiner; an annotation without a mask gets the box alone, and says so."""
    import dataclasses

    from hqsam.hqsam_core.guided import FALLBACK, refine_guided

    polygon = [[6.0, 4.0, 30.0, 4.0, 30.0, 24.0, 6.0, 24.0]]
    row = decode(
        read_row(
            png(texture(H, W, 4)),
            boxes=((4, 4, 30, 20), (8, 6, 30, 20), (200, 1, 5, 5)),
            segmentations=[json.dumps(polygon), "", json.dumps(polygon)],
        )
    )
    stage = RefineMasks(dataclasses.replace(settings, prompt=prompt, prompt_trials=2, min_region_area=4))
    stage.setup()
    (refined,) = to_rows(to_batch(stage.process(to_rows(to_batch([dict(row)])))))
    assert list(refined["statuses"]) == [Status.OK, Status.OK, Status.INVALID_BOX]
    assert list(refined["prompt_kinds"]) == [prompt, FALLBACK, ""]

    original = square(6, 4, 30, 24)
    (expected,) = refine_guided(
        stage.refiner,
        [row["pixels"]],
        [row["prompts"][:2]],
        [[original, None]],
        [[100, 101]],
        stage.settings.guidance,
        min_region_area=4,
    )
    np.testing.assert_array_equal(refined["packed_masks"], expected.packed_masks)
    np.testing.assert_allclose(refined["scores"][:2], expected.scores, atol=1e-6)
    np.testing.assert_allclose(refined["stabilities"][:2], expected.stability, atol=1e-6)
    np.testing.assert_allclose(refined["sam_hq_ious"][:2], expected.sam_hq_iou, atol=1e-6)
    assert np.isnan(refined["stabilities"][2]) and np.isnan(refined["sam_hq_ious"][2])


# ---------------------------------------------------------------- EncodeMasks


def test_encode_masks_rle_box_area_and_change_against_the_input_mask() -> None:
    masks = [square(4, 4, 30, 20), square(10, 10, 50, 40), square(0, 0, W, H)]
    original = square(6, 4, 30, 24)
    segmentations = [
        json.dumps([[6.0, 4.0, 30.0, 4.0, 30.0, 24.0, 6.0, 24.0]]),  # a polygon
        "",  # the invalid box's, never compared
        "{not json",  # unreadable: no comparison, the refinement stays
        json.dumps(encode_rle(masks[2])),  # the refined mask itself, as an RLE
    ]
    statuses = [Status.OK, Status.INVALID_BOX, Status.OK, Status.OK]
    row = (
        task(boxes=[(0, 0, 1, 1)] * 4, segmentations=segmentations)
        | {
            "prompts": np.full((4, 4), np.nan),
            "statuses": statuses,
            "errors": ["", "bad box", "", ""],
            "scores": [0.5, math.nan, 0.25, 0.75],
            "packed_masks": np.packbits(np.stack(masks).reshape(3, -1), axis=1),
        }
        | ratings(4)
    )
    (row,) = EncodeMasks().process([row])
    assert set(row) == set(IMAGE_ENCODED.names)

    for k, mask in zip([0, 2, 3], masks):
        np.testing.assert_array_equal(rle_mask(row["rle_counts"][k]), mask)
        rle = {"size": [H, W], "counts": row["rle_counts"][k].encode()}
        assert row["areas"][k] == mask.sum() == mask_utils.area(rle)
        np.testing.assert_allclose(row["refined_bboxes"][k], mask_utils.toBbox(rle))
    assert row["rle_counts"][1] == "" and row["areas"][1] == -1 and np.isnan(row["refined_bboxes"][1]).all()

    assert row["ious"][0] == pytest.approx(coco_iou(masks[0], original), abs=1e-6)
    assert row["boundary_ious"][0] == pytest.approx(boundary_iou_batch(masks[0][None], original[None])[0])
    assert 0 < row["boundary_ious"][0] < 1
    assert row["ious"][3] == row["boundary_ious"][3] == 1.0
    assert np.isnan(row["ious"][[1, 2]]).all() and np.isnan(row["boundary_ious"][[1, 2]]).all()


def test_encode_masks_leaves_rows_without_ok_annotations_empty() -> None:
    row = (
        task(uri=None, boxes=[(0, 0, 1, 1)] * 2, width=None, height=None)
        | {
            "prompts": np.full((2, 4), np.nan),
            "statuses": [Status.IMAGE_MISSING] * 2,
            "errors": ["no image record"] * 2,
            "scores": [math.nan] * 2,
            "packed_masks": np.zeros((0, 0), np.uint8),
        }
        | ratings(2)
    )
    (row,) = EncodeMasks().process([row])
    assert set(row) == set(IMAGE_ENCODED.names)
    assert row["rle_counts"] == ["", ""] and list(row["areas"]) == [-1, -1] and np.isnan(row["ious"]).all()


def ratings(count: int) -> dict:
    """RefineMasks' ratings of `count` annotations: none made."""
    nothing = np.full(count, np.nan, np.float32)
    return {"stabilities": nothing, "sam_hq_ious": nothing.copy(), "prompt_kinds": [""] * count}


# ---------------------------------------------------------------- JudgeRows


def test_judge_rows_gives_ok_annotations_the_policy_verdict_and_the_failing_clause() -> None:
    row = {
        "statuses": [Status.OK, Status.OK, Status.INVALID_BOX, Status.OK],
        "scores": [0.9, 0.9, math.nan, 0.2],
        "stabilities": np.array([0.95, 0.5, np.nan, 0.99], np.float32),
        "sam_hq_ious": np.array([0.9, 0.9, np.nan, 0.9], np.float32),
        "ious": np.array([0.8, 0.8, np.nan, np.nan], np.float32),  # the last has no original mask
        "boundary_ious": np.array([0.7, 0.7, np.nan, np.nan], np.float32),
        "areas": np.array([100, 100, -1, 5]),
        "category_ids": [1, 2, 3, 1],
    }
    (judged,) = JudgeRows("stability >= 0.9 and iou_vs_original >= 0.5 and area > 10").process([row])
    assert list(judged["accepted"]) == [1, 0, -1, 0]
    assert judged["rejected_by"] == ["", "stability >= 0.9", "", "area > 10"]


# ---------------------------------------------------------------- WriteParquetParts


def test_write_parquet_parts_writes_one_row_per_annotation(tmp_path) -> None:
    mask = square(4, 4, 30, 20)
    ok = task(1, boxes=[(4, 4, 26, 16), (0, 0, 0, 0)], segmentations=[json.dumps(encode_rle(mask)), ""]) | {
        "iscrowd": [0, 1],
        "prompts": np.array([[4.0, 4.0, 30.0, 20.0], [np.nan] * 4]),
        "statuses": [Status.OK, Status.INVALID_BOX],
        "errors": ["", "box has zero size"],
        "scores": [0.5, math.nan],
        "packed_masks": np.packbits(mask.reshape(1, -1), axis=1),
        "stabilities": np.array([0.875, np.nan], np.float32),
        "sam_hq_ious": np.array([0.625, np.nan], np.float32),
        "prompt_kinds": ["box+mask", ""],
    }
    missing = (
        task(2, uri=None, width=None, height=None)
        | {
            "prompts": np.full((1, 4), np.nan),
            "statuses": [Status.IMAGE_MISSING],
            "errors": ["no image record for image_id 2"],
            "scores": [math.nan],
            "packed_masks": np.zeros((0, 0), np.uint8),
        }
        | ratings(1)
    )
    encoded = JudgeRows("iou_vs_original >= 0.5").process(EncodeMasks().process([ok, missing]))
    stage = WriteParquetParts(str(tmp_path) + "/", "vit_tiny", images_per_file=2)
    returned = stage.process(encoded)
    assert returned == [
        {"image_id": 1, "statuses": [Status.OK, Status.INVALID_BOX]},
        {"image_id": 2, "statuses": [Status.IMAGE_MISSING]},
    ]
    assert all(set(row) == set(IMAGE_WRITTEN.names) for row in returned)

    (rows_folder,) = tmp_path.iterdir()  # the parts have OUT/rows to themselves
    assert rows_folder.name == "rows"
    (part,) = rows_folder.iterdir()  # no temp file left behind
    # named by its rows' first input positions (100 and 200): unique even where image ids repeat
    name = hashlib.sha256(np.array([100, 200], np.int64).tobytes()).hexdigest()[:32]
    assert part.name == f"part-{name}.parquet"
    table = pq.read_table(part)
    assert table.schema.equals(REFINED_ANNOTATION)
    rows = table.to_pylist()
    assert [(r["annotation_id"], r["ann_index"], r["image_id"], r["status"]) for r in rows] == [
        (10, 100, 1, "ok"),
        (11, 101, 1, "invalid_box"),
        (20, 200, 2, "image_missing"),
    ]
    first = rows[0]
    np.testing.assert_array_equal(rle_mask(first["segmentation"]["counts"]), mask)
    assert first["segmentation"]["size"] == [H, W] and first["area"] == mask.sum()
    assert first["bbox"] == [4.0, 4.0, 26.0, 16.0] and first["score"] == 0.5 and first["error"] is None
    assert (
        first["iou_vs_original"] == first["boundary_iou_vs_original"] == 1.0 and first["model"] == "vit_tiny"
    )
    for row in rows[1:]:
        assert row["segmentation"] is None and row["bbox"] is None and row["area"] is None
        assert row["score"] is None and row["iou_vs_original"] is None and row["error"]
    assert rows[2]["image_uri"] is None and rows[2]["category_id"] == 1
    # the image as the input names it, its size, crowd flag and the prompt given (none: null)
    assert [(r["file_name"], r["width"], r["height"], r["iscrowd"]) for r in rows] == [
        ("unused.png", W, H, 0),
        ("unused.png", W, H, 1),
        (None, None, None, 0),
    ]
    assert [r["prompt_box"] for r in rows] == [[4.0, 4.0, 30.0, 20.0], None, None]
    assert [(r["prompt"], r["stability"], r["sam_hq_iou"]) for r in rows] == [
        ("box+mask", 0.875, 0.625),
        (None, None, None),
        (None, None, None),
    ]
    assert [(r["accepted"], r["rejected_by"]) for r in rows] == [(True, None), (None, None), (None, None)]

    assert stage.process(encoded) == returned  # a rerun replaces its part, never adds a copy
    assert [p.name for p in rows_folder.iterdir()] == [part.name]


# ---------------------------------------------------------------- the whole chain, one process


class ExpectFields(Stage):
    """Passes rows on unchanged, after checking that they hold exactly the fields of `row`."""

    def __init__(self, row: pa.Schema, after: str) -> None:
        self.row, self.after = row, after

    def process(self, rows: list[dict]) -> list[dict]:
        for row in rows:
            assert set(row) == set(self.row.names), (self.after, sorted(row))
        return rows


def test_the_chain_runs_locally_on_the_shapes_example(settings, tmp_path) -> None:
    coco = json.loads(SHAPES.read_text())
    tasks = read_manifest(str(SHAPES)).tasks.to_pylist()
    missing = task(99, str(tmp_path / "absent.png"))  # a failure row flows through every stage too
    stages = refine_stages(str(tmp_path / "out"), settings)
    checked = [ExpectFields(IMAGE_TASK, "source")]
    for stage, after in zip(stages, ROWS[1:]):
        checked += [stage, ExpectFields(after, stage.name)]

    rows = list(run_local([*tasks, missing], checked))
    assert [row["image_id"] for row in rows] == [image["id"] for image in coco["images"]] + [99]
    assert sum(len(row["statuses"]) for row in rows) == len(coco["annotations"]) + 1

    written = pq.read_table(tmp_path / "out" / "rows").to_pylist()
    assert sorted(row["annotation_id"] for row in written) == sorted(
        [a["id"] for a in coco["annotations"]] + [990]
    )
    for row in written[:-1]:  # each row is the annotation at its position in the input
        annotation = coco["annotations"][row["ann_index"]]
        assert (row["annotation_id"], row["image_id"]) == (annotation["id"], annotation["image_id"])
    assert sorted(row["ann_index"] for row in written[:-1]) == list(range(len(coco["annotations"])))
    statuses = {row["annotation_id"]: row["status"] for row in written}
    assert statuses.pop(990) == "image_missing" and set(statuses.values()) == {"ok"}
    by_image: dict[int, list] = {}
    for row in written:
        by_image.setdefault(row["image_id"], []).append(row["status"])
    assert {row["image_id"]: list(row["statuses"]) for row in rows} == by_image
    images = {image["id"]: image for image in coco["images"]}
    for row in written[:-1]:  # what the input says of each annotation, carried into its row
        annotation, image = coco["annotations"][row["ann_index"]], images[row["image_id"]]
        assert (row["file_name"], row["width"], row["height"]) == (
            image["file_name"],
            image["width"],
            image["height"],
        )
        x, y, w, h = annotation["bbox"]
        clipped = [max(0, x), max(0, y), min(image["width"], x + w), min(image["height"], y + h)]
        assert row["iscrowd"] == annotation["iscrowd"] and row["prompt_box"] == pytest.approx(clipped)
    assert written[-1]["file_name"] == "absent.png" and written[-1]["prompt_box"] is None
    sizes = {image["id"]: [image["height"], image["width"]] for image in coco["images"]}
    for row in written[:-1]:
        rle = {"size": row["segmentation"]["size"], "counts": row["segmentation"]["counts"].encode()}
        assert rle["size"] == sizes[row["image_id"]] and row["area"] == mask_utils.area(rle)
