"""`hqsam refine` end to end on a real local Ray: rows, statuses, COCO output, S3, OUT handling.

Expected values come from the input files, from pycocotools, and from a bare `BoxRefiner` run on
the same pixels and prompts: the pipeline must give exactly the bare refiner's masks.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from hqsam.hqsam_core import BoxRefiner, build_hqsam, save_model
from hqsam.hqsam_core.testing.random_weights import randomize_
from hqsam.jobs.cli import app
from hqsam.pipeline.refine_pipeline import RefineSettings
from hqsam.pipeline.refine_run import RefineConfig, run_refine
from hqsam.schemas.refined import REFINED_ANNOTATION
from tests.conftest import ROOT, shared_fixture

W, H = 64, 48  # generated images


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random vit_tiny weights whose masks are neither empty nor full on the small generated images
    and differ between the triangle's tight box and its bbox (many seeds fill every 64x48 image).

    The weights are picked by the bare refiner, so the tests below can tell prompts apart.
    """
    tight, box = [6, 4, 40, 35], xyxy([20, 20, 30, 20])  # the tight box of the triangle used below
    images = [texture(H, W, 30 + i) for i in range(3)]
    for seed in range(5, 40):
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the prompt encoder's random Fourier features are drawn at build
            model = randomize_(build_hqsam("vit_tiny"), seed=seed)
        refiner = BoxRefiner(model, "cpu")
        plain = refiner.refine(images, [np.array([box], np.float32)] * 3)
        (by_tight,) = refiner.refine(images[:1], [np.array([tight], np.float32)])
        fractions = [result.masks.mean() for result in plain]
        if all(0.02 < f < 0.98 for f in fractions) and not np.array_equal(by_tight.masks, plain[0].masks):
            path = tmp_path_factory.mktemp("ckpt") / f"tiny_seed{seed}.pth"
            save_model(model, str(path))
            return path
    raise AssertionError("no seed in 5..39 gives discriminative masks")


@pytest.fixture(scope="module")
def refiner(checkpoint: Path):
    """The bare refiner with the actors' weights and, like them, one torch thread: the same
    computation, so the same masks bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield BoxRefiner(build_hqsam("vit_tiny", str(checkpoint)), "cpu")
    torch.set_num_threads(threads)


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """Blocky random RGB pixels: structure for the model to segment, and nothing like grey."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(base, np.ones((8, 8, 1), np.uint8))[:height, :width])


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def halved(data: bytes) -> bytes:
    """The first half of a file: cut in the middle of its pixel data."""
    return data[: len(data) // 2]


def xyxy(box: list[float]) -> list[float]:
    x, y, w, h = box
    return [x, y, x + w, y + h]


def polygon_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """pycocotools' rasterisation of COCO polygons (as COCO.annToMask does it)."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)


def rle_mask(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode()}).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def read_rows(out: Path | str, fs=None) -> dict[int, dict]:
    """Every part file in OUT/rows read with pyarrow, keyed by annotation id; fails on a duplicate id."""
    if fs is None:
        files, fs = sorted(str(p) for p in Path(out, "rows").glob("part-*.parquet")), None
    else:
        files = sorted(fs.glob(f"{out}/rows/part-*.parquet"))
    assert files, f"no part files in {out}"
    tables = [pq.read_table(f, filesystem=fs) for f in files]
    metadata = pq.ParquetFile(files[0], filesystem=fs).metadata
    assert metadata.row_group(0).column(0).compression == "ZSTD"
    for table in tables:
        assert table.schema.equals(REFINED_ANNOTATION), table.schema
    rows = pa.concat_tables(tables).to_pylist()
    ids = [row["annotation_id"] for row in rows]
    assert len(ids) == len(set(ids)), "an annotation has more than one row"
    return {row["annotation_id"]: row for row in rows}


def assert_refined_like(row: dict, mask: np.ndarray, score: float) -> None:
    """An ok row: its RLE decodes to the bare refiner's mask, area and bbox are pycocotools' of it."""
    assert row["status"] == "ok" and row["error"] is None, row
    rle = row["segmentation"]
    assert list(rle["size"]) == list(mask.shape)
    np.testing.assert_array_equal(rle_mask(rle), mask)
    coco_rle = {"size": list(rle["size"]), "counts": rle["counts"].encode()}
    assert row["area"] == int(mask_utils.area(coco_rle)) == int(mask.sum())
    assert row["bbox"] == pytest.approx([float(v) for v in mask_utils.toBbox(coco_rle)])
    assert row["score"] == pytest.approx(score, abs=1e-5)


def refine_cli(*args: object):
    return CliRunner().invoke(
        app, ["refine", *map(str, args), "--device", "cpu", "--threads", "1", "--no-progress"]
    )


def assert_exit(result, code: int) -> None:
    assert result.exit_code == code, (result.output, result.stderr, result.exception)


# ---------------------------------------------------------------- the real labelme-voc fixture


@pytest.fixture(scope="module")
def labelme(ray_session, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """One run over the real fixture with --format coco (which writes the Parquet parts too)."""
    root = shared_fixture("labelme-voc")
    out = tmp_path_factory.mktemp("labelme") / "out"
    # One image per refine call, as the bare refiner is called below: the same float operations.
    settings = RefineSettings("vit_tiny", str(checkpoint), None, "cpu", batch_size=1, torch_threads=1)
    config = RefineConfig(str(root / "annotations.json"), str(out), format="coco", settings=settings)
    summary = run_refine(config, progress=False)
    coco = json.loads((root / "annotations.json").read_text())
    return root, coco, out, summary


@pytest.mark.slow
def test_labelme_parquet_rows_are_the_bare_refiners_masks(labelme, refiner, checkpoint) -> None:
    root, coco, out, summary = labelme
    rows = read_rows(out)
    model = "vit_tiny:sha256=" + hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]
    annotations = {a["id"]: a for a in coco["annotations"]}
    assert sorted(rows) == sorted(annotations) and len(rows) == 12
    assert 0 in {row["image_id"] for row in rows.values()}

    for image in coco["images"]:
        own = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        pixels = np.asarray(Image.open(root / image["file_name"]).convert("RGB"))
        assert pixels.shape[:2] == (image["height"], image["width"])
        (expected,) = refiner.refine([pixels], [np.array([xyxy(a["bbox"]) for a in own])])
        for k, annotation in enumerate(own):
            row = rows[annotation["id"]]
            assert row["image_id"] == image["id"] and row["category_id"] == annotation["category_id"]
            assert row["image_uri"].endswith(image["file_name"]) and row["model"] == model
            assert_refined_like(row, expected.masks[k], expected.scores[k])
            original = polygon_mask(annotation["segmentation"], image["height"], image["width"])
            assert row["iou_vs_original"] == pytest.approx(iou(expected.masks[k], original), abs=1e-6)
            assert 0.0 <= row["boundary_iou_vs_original"] <= 1.0

    names = {p.name for p in out.iterdir()}
    assert names == {"annotations.json", "summary.json", "_hqsam_run.json", "rows"}  # no temp file, no lease
    assert all(p.name.startswith("part-") and p.suffix == ".parquet" for p in (out / "rows").iterdir())
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["annotations_total"] == 12 and on_disk["annotations_ok"] == 12
    assert on_disk["errors"] == {} and on_disk["images_resumed"] == 0
    assert on_disk["wall_time_s"] > 0 and on_disk["annotations_per_s"] > 0 and on_disk["images_per_s"] > 0
    assert on_disk["model"] == model
    assert on_disk["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


@pytest.mark.slow
def test_labelme_coco_output_loads_and_evaluates(labelme, capsys) -> None:
    root, coco, out, _ = labelme
    refined_path = out / "annotations.json"
    refined = json.loads(refined_path.read_text())
    for key in set(coco) - {"annotations"}:  # info, licenses, images, categories and the odd "type"
        assert refined[key] == coco[key], key
    assert [a["id"] for a in refined["annotations"]] == [a["id"] for a in coco["annotations"]]

    ground = COCO(str(refined_path))
    for annotation in ground.dataset["annotations"]:
        original = next(a for a in coco["annotations"] if a["id"] == annotation["id"])
        assert set(original) - {"segmentation", "area", "bbox"} <= set(annotation)
        assert set(annotation["hqsam"]) == {
            *("score", "status", "error", "iou_vs_original", "boundary_iou_vs_original", "model"),
            *("accepted", "decided_by"),
        }
        assert annotation["hqsam"]["status"] == "ok" and annotation["hqsam"]["error"] is None
        # the default policy: the refined mask only where it overlaps its original by half or more
        accepted = annotation["hqsam"]["iou_vs_original"] >= 0.5
        assert annotation["hqsam"]["accepted"] is accepted and annotation["hqsam"]["decided_by"] == "policy"
        if not accepted:  # the original, as it was
            assert [annotation[key] for key in ("segmentation", "area", "bbox")] == [
                original[key] for key in ("segmentation", "area", "bbox")
            ]
            continue
        rle = ground.annToRLE(annotation)
        assert annotation["area"] == int(mask_utils.area(rle))
        assert annotation["bbox"] == pytest.approx([float(v) for v in mask_utils.toBbox(rle)])

    # The refined file is the ground truth, the input's own masks the detections.
    source = COCO(str(root / "annotations.json"))
    detections = []
    for annotation in source.dataset["annotations"]:
        rle = source.annToRLE(annotation)
        segmentation = {"size": list(rle["size"]), "counts": rle["counts"].decode()}
        detections.append(
            {
                "image_id": annotation["image_id"],
                "category_id": annotation["category_id"],
                "segmentation": segmentation,
                "score": 1.0,
            }
        )
    evaluation = COCOeval(ground, ground.loadRes(detections), "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats.shape == (12,)
    assert 0.0 <= evaluation.stats[0] <= 1.0
    assert "Average Precision" in capsys.readouterr().out


# ---------------------------------------------------------------- every status code


def status_dataset(root: Path) -> tuple[Path, dict[int, str], dict]:
    """Images and a COCO file (written by Python's json, NaN included) that hit every status code."""
    (root / "imgs").mkdir(parents=True)
    rgb = texture(H, W, seed=1)
    files = {
        "rgb.png": encoded(Image.fromarray(rgb), "PNG"),
        "empty.jpg": b"",
        "text.jpg": b"this is a text file, not a JPEG\n",
        "trunc.jpg": halved(encoded(Image.fromarray(texture(H, W, 2)), "JPEG")),
        "trunc.png": halved(encoded(Image.fromarray(texture(H, W, 3)), "PNG")),
        "size.png": encoded(Image.fromarray(texture(H, W, 4)), "PNG"),
        "gray.png": encoded(Image.fromarray(texture(H, W, 6)[:, :, 0]), "PNG"),
        "rgba.png": encoded(
            Image.fromarray(np.dstack([texture(H, W, 7), texture(H, W, 8)[:, :, :1]])), "PNG"
        ),
        "palette.png": encoded(Image.fromarray(texture(H, W, 9)).quantize(16), "PNG"),
        "cmyk.jpg": encoded(Image.fromarray(texture(H, W, 10)).convert("CMYK"), "JPEG"),
        "gray16.png": encoded(Image.fromarray(texture(H, W, 11)[:, :, 0].astype(np.uint16) * 257), "PNG"),
        "line.png": encoded(Image.fromarray(texture(1, 3000, 12)), "PNG"),  # 1 px high: too thin to resize
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    files["exif.jpg"] = encoded(Image.fromarray(texture(H, W, 5)), "JPEG", exif=exif)  # stored 64x48
    for name, data in files.items():
        (root / "imgs" / name).write_bytes(data)
    assert Image.open(io.BytesIO(files["palette.png"])).mode == "P"
    assert Image.open(io.BytesIO(files["cmyk.jpg"])).mode == "CMYK"
    assert Image.open(io.BytesIO(files["gray16.png"])).mode.startswith("I")

    images = []
    for image_id, name, width, height in [
        (0, "rgb.png", W, H),
        (1, "absent.png", W, H),
        (2, "empty.jpg", W, H),
        (3, "text.jpg", W, H),
        (4, "trunc.jpg", W, H),
        (5, "trunc.png", W, H),
        (6, "size.png", 60, 40),  # the record disagrees with the pixels
        (7, "exif.jpg", H, W),  # the record has the displayed (rotated) size
        (8, "gray.png", W, H),
        (9, "rgba.png", W, H),
        (10, "palette.png", W, H),
        (11, "cmyk.jpg", W, H),
        (12, "gray16.png", W, H),
        (13, "line.png", 3000, 1),
    ]:
        images.append({"id": image_id, "file_name": f"imgs/{name}", "width": width, "height": height})
    square = [[8.0, 6.0, 38.0, 6.0, 38.0, 26.0, 8.0, 26.0]]
    crowd = {"size": [H, W], "counts": [100, 50, H * W - 150]}
    specs = [  # id, image_id, bbox, extra fields, expected status
        (1, 0, [8, 6, 30, 20], {"segmentation": square, "x_note": "kept"}, "ok"),
        (2, 0, [40, 30, 40, 30], {}, "ok"),  # partly outside: clipped and refined
        (3, 0, [math.nan, 5, 10, 10], {}, "invalid_box"),
        (4, 0, [10, 10, 0, 5], {}, "invalid_box"),
        (5, 0, [10, 10, -5, 5], {}, "invalid_box"),
        (6, 0, [100, 100, 10, 10], {}, "invalid_box"),
        (7, 0, [8, 6, 30, 20], {"iscrowd": 1, "segmentation": crowd}, "crowd_skipped"),
        (8, 1, [4, 4, 20, 20], {"segmentation": square}, "image_missing"),
        (9, 99, [4, 4, 20, 20], {}, "image_missing"),  # no image record
        (10, 2, [4, 4, 20, 20], {}, "image_unreadable"),
        (11, 3, [4, 4, 20, 20], {}, "image_unreadable"),
        (12, 4, [4, 4, 20, 20], {}, "image_unreadable"),
        (13, 5, [4, 4, 20, 20], {}, "image_unreadable"),
        (14, 6, [4, 4, 20, 20], {}, "image_size_mismatch"),
        (15, 7, [4, 4, 30, 40], {}, "ok"),
        (16, 8, [4, 4, 30, 20], {}, "ok"),
        (17, 9, [4, 4, 30, 20], {}, "ok"),
        (18, 10, [4, 4, 30, 20], {}, "ok"),
        (19, 11, [4, 4, 30, 20], {}, "ok"),
        (20, 12, [4, 4, 30, 20], {}, "ok"),
        (21, 13, [0, 0, 3000, 1], {}, "inference_failed"),
    ]
    annotations, expected = [], {}
    for ann_id, image_id, bbox, extra, status in specs:
        annotation = {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": bbox, "iscrowd": 0}
        annotations.append({**annotation, "segmentation": [], "area": 0, **extra})
        expected[ann_id] = status
    coco = {
        "info": {"description": "every status code"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing", "supercategory": "any"}],
        "x_extra": {"source": "generated", "numbers": [1, 2]},
    }
    path = root / "coco.json"
    path.write_text(json.dumps(coco))  # Python's json writes the NaN bbox as NaN
    assert "NaN" in path.read_text()
    return path, expected, coco


@pytest.fixture(scope="module")
def statuses(ray_session, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("statuses")
    path, expected, coco = status_dataset(root / "data")
    out = root / "out"
    result = refine_cli(
        path, "--out", out, "--format", "coco", "--checkpoint", checkpoint, "--batch-size", "3"
    )
    return root / "data", expected, coco, out, result


@pytest.mark.slow
def test_every_status_code_one_row_each(statuses, refiner) -> None:
    data, expected, coco, out, result = statuses
    assert_exit(result, 1)  # more than 1 % failed, yet every row is written
    rows = read_rows(out)
    assert {k: row["status"] for k, row in rows.items()} == expected
    for row in rows.values():
        if row["status"] == "ok":
            assert row["error"] is None and row["segmentation"] is not None
            size = [W, H] if row["image_id"] == 7 else [H, W]  # the EXIF image is upright now
            assert list(row["segmentation"]["size"]) == size
        else:
            assert row["error"] and "\n" not in row["error"], row
            assert row["segmentation"] is None and row["bbox"] is None and row["area"] is None
    assert "iscrowd" in rows[7]["error"] and "99" in rows[9]["error"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["annotations_total"] == len(expected) == summary["annotations_written"]
    assert summary["annotations_ok"] == 8 and summary["complete"]
    counts = {status: list(expected.values()).count(status) for status in set(expected.values())}
    assert summary["errors"] == {s: n for s, n in counts.items() if s != "ok"}

    # The pipeline's masks are the bare refiner's, for the clipped box and for the EXIF-rotated
    # image, decoded here with PIL alone.
    rgb = np.asarray(Image.open(data / "imgs/rgb.png").convert("RGB"))
    rotated = np.asarray(ImageOps.exif_transpose(Image.open(data / "imgs/exif.jpg")).convert("RGB"))
    assert rotated.shape[:2] == (W, H)
    # Each is the only image its --batch-size 3 batch refines (its batch mates have failed), so it
    # is refined alone here too.
    (plain,) = refiner.refine([rgb], [np.array([xyxy([8, 6, 30, 20]), [40, 30, W, H]])])
    (upright,) = refiner.refine([rotated], [np.array([xyxy([4, 4, 30, 40])])])
    results = [plain, upright]
    for (i, k), ann_id in zip([(0, 0), (0, 1), (1, 0)], [1, 2, 15]):
        assert_refined_like(rows[ann_id], results[i].masks[k], results[i].scores[k])
    square = polygon_mask(coco["annotations"][0]["segmentation"], H, W)
    assert rows[1]["iou_vs_original"] == pytest.approx(iou(results[0].masks[0], square), abs=1e-6)
    assert rows[2]["iou_vs_original"] is None  # the input had no mask


@pytest.mark.slow
def test_status_run_coco_output_keeps_failed_and_unknown_fields(statuses) -> None:
    _, expected, coco, out, _ = statuses
    refined = json.loads((out / "annotations.json").read_text())
    for key in ("info", "licenses", "images", "categories", "x_extra"):
        assert refined[key] == coco[key], key
    ground = COCO(str(out / "annotations.json"))
    assert len(ground.dataset["annotations"]) == len(expected)
    originals = {a["id"]: a for a in coco["annotations"]}
    for annotation in ground.dataset["annotations"]:
        original, status = originals[annotation["id"]], expected[annotation["id"]]
        assert annotation["hqsam"]["status"] == status
        if status == "ok" and annotation["hqsam"]["accepted"]:
            rle = ground.annToRLE(annotation)
            assert annotation["area"] == int(mask_utils.area(rle))
            assert annotation["bbox"] == pytest.approx([float(v) for v in mask_utils.toBbox(rle)])
            assert annotation["hqsam"]["score"] is not None
        elif status == "ok":  # rejected by the policy: the original stays, as it was
            iou = annotation["hqsam"]["iou_vs_original"]
            assert iou is not None and iou < 0.5 and annotation["hqsam"]["decided_by"] == "policy"
            assert [annotation[key] for key in ("segmentation", "area", "bbox")] == [
                original[key] for key in ("segmentation", "area", "bbox")
            ]
        else:  # failed or skipped: the original segmentation, box and area stay
            assert annotation["segmentation"] == original["segmentation"]
            assert annotation["area"] == original["area"]
            assert annotation["hqsam"]["error"] and "\n" not in annotation["hqsam"]["error"]
            if annotation["id"] != 3:  # JSON has no NaN: the invalid box is written as null
                assert annotation["bbox"] == original["bbox"]
    assert ground.anns[1]["x_note"] == "kept"  # unknown annotation field
    assert ground.anns[1]["hqsam"]["iou_vs_original"] is not None


@pytest.mark.slow
def test_max_error_rate_decides_the_exit_code(statuses, checkpoint: Path) -> None:
    data, expected, _, out, first = statuses
    assert_exit(first, 1)  # default --max-error-rate 0.01
    failed = sum(status not in ("ok", "crowd_skipped") for status in expected.values())
    share = failed / len(expected)
    before = sorted(p.name for p in (out / "rows").glob("part-*.parquet"))
    for rate, code in [("1.0", 0), (repr(share), 0), (f"{share - 0.001:.4f}", 1)]:
        again = refine_cli(
            data / "coco.json",
            "--out",
            out,
            "--checkpoint",
            checkpoint,
            "--resume",
            "--max-error-rate",
            rate,
        )
        assert_exit(again, code)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["images_resumed"] == summary["images_total"] == 15
        assert summary["error_rate"] == pytest.approx(share)
    assert sorted(p.name for p in (out / "rows").glob("part-*.parquet")) == before  # nothing refined twice
    assert {k: row["status"] for k, row in read_rows(out).items()} == expected


# ---------------------------------------------------------------- object storage


@pytest.mark.slow
def test_s3_in_and_out_without_credentials_in_logs(s3_bucket, checkpoint: Path, tmp_path) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    pixels = {"pics/a.png": texture(H, W, 21), "pics/sub/b.jpg": texture(40, 56, 22)}
    for name, array in pixels.items():
        fmt = "PNG" if name.endswith("png") else "JPEG"
        fs.pipe(f"{s3_bucket}/{name}", encoded(Image.fromarray(array), fmt))
    coco = {
        "images": [
            {"id": 0, "file_name": "a.png", "width": W, "height": H},
            {"id": 5, "file_name": "sub/b.jpg", "width": 56, "height": 40},
        ],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 1, "bbox": [5, 5, 30, 30], "iscrowd": 0},
            {"id": 1, "image_id": 0, "category_id": 1, "bbox": [20, 10, 40, 30], "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 2, "bbox": [2, 3, 40, 30], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    fs.pipe(f"{s3_bucket}/ann/coco.json", json.dumps(coco).encode())
    fs.invalidate_cache()

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    command = [sys.executable, "-m", "hqsam.jobs.cli", "refine", f"s3://{s3_bucket}/ann/coco.json"]
    command += ["--images", f"s3://{s3_bucket}/pics", "--out", f"s3://{s3_bucket}/out", "--format", "coco"]
    # -v: Ray's own lines too (they name the session's log folder), none of which may hold the secret
    command += ["--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress", "-v"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in done.stdout + done.stderr
    # Nor in the Ray session's own log files (workers read the bucket with these credentials).
    session = re.search(r"(/tmp/ray/session_[^/\s]+)/logs", done.stdout + done.stderr)
    assert session, done.stdout + done.stderr
    logs = [p for p in Path(session[1], "logs").rglob("*") if p.is_file()]
    assert logs and not [p for p in logs if secret.encode() in p.read_bytes()]

    fs.invalidate_cache()
    rows = read_rows(f"{s3_bucket}/out", fs)
    assert sorted(rows) == [0, 1, 2]
    for annotation in coco["annotations"]:
        row = rows[annotation["id"]]
        name = "pics/a.png" if annotation["image_id"] == 0 else "pics/sub/b.jpg"
        assert row["image_uri"] == f"s3://{s3_bucket}/{name}" and row["status"] == "ok"
        rle = {"size": row["segmentation"]["size"], "counts": row["segmentation"]["counts"].encode()}
        assert list(rle["size"]) == list(pixels[name].shape[:2])
        assert row["area"] == int(mask_utils.area(rle))

    summary_text = fs.cat(f"{s3_bucket}/out/summary.json").decode()
    assert secret not in summary_text
    summary = json.loads(summary_text)
    assert summary["annotations_total"] == summary["annotations_ok"] == 3
    local = tmp_path / "annotations.json"
    fs.get(f"{s3_bucket}/out/annotations.json", str(local))
    refined = COCO(str(local))
    assert sorted(refined.anns) == [0, 1, 2]
    assert all(a["hqsam"]["status"] == "ok" for a in refined.anns.values())
    listed = fs.ls(f"{s3_bucket}/out", refresh=True) + fs.ls(f"{s3_bucket}/out/rows", refresh=True)
    assert not [name for name in listed if name.endswith(".tmp")]
    assert all(name.rsplit("/", 1)[-1].startswith("part-") for name in fs.ls(f"{s3_bucket}/out/rows"))


# ---------------------------------------------------------------- OUT handling, --box-source, --limit


@pytest.mark.slow
def test_refuse_overwrite_box_source_and_limit(ray_session, checkpoint: Path, refiner, tmp_path) -> None:
    (tmp_path / "data").mkdir()
    images, annotations = [], []
    for image_id in range(3):
        Image.fromarray(texture(H, W, 30 + image_id)).save(tmp_path / "data" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": W, "height": H})
        triangle = [[6.0, 4.0, 40.0, 10.0, 20.0, 36.0]]
        # The bbox is deliberately not the polygon's: the two --box-source modes prompt differently.
        annotations.append(
            {"id": 10 + image_id, "image_id": image_id, "category_id": 1, "bbox": [20, 20, 30, 20]}
            | {"segmentation": triangle, "iscrowd": 0}
        )
    path = tmp_path / "data" / "coco.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1}]}))
    out = tmp_path / "out"
    common = ["--out", out, "--checkpoint", checkpoint, "--batch-size", "1"]

    first = refine_cli(path, *common, "--box-source", "segmentation", "--limit", "2")
    assert_exit(first, 0)
    rows = read_rows(out)
    assert sorted(rows) == [10, 11]  # the first two images only
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_total"] == 2 and summary["annotations_total"] == 2

    mask = polygon_mask(annotations[0]["segmentation"], H, W)
    ys, xs = np.nonzero(mask)
    tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # pixel-edge box around the polygon
    pixels = np.asarray(Image.open(tmp_path / "data" / "0.png").convert("RGB"))
    features = refiner.encode([pixels])  # then one decoder call per prompt, as in each run
    by_mask, by_box = (
        refiner.decode(features, np.array([box]), np.zeros(1))[0]
        for box in (tight, xyxy(annotations[0]["bbox"]))
    )
    assert_refined_like(rows[10], by_mask.masks[0], by_mask.scores[0])

    parts = sorted((out / "rows").glob("part-*.parquet"))
    refused = refine_cli(path, *common)
    assert_exit(refused, 2)
    message = refused.stderr.strip()
    assert "\n" not in message and "not empty" in message and "--resume" in message, message
    assert sorted((out / "rows").glob("part-*.parquet")) == parts  # left alone

    assert not np.array_equal(by_mask.masks[0], by_box.masks[0])  # the two prompts differ
    (out / "rows" / ".part-0123456789abcdef.parquet.tmp").write_bytes(b"left by a killed writer")
    replaced = refine_cli(path, *common, "--overwrite", "--limit", "1")  # prompts from the bbox now
    assert_exit(replaced, 0)
    assert sorted(p.name for p in out.iterdir()) == ["_hqsam_run.json", "rows", "summary.json"]
    assert all(p.name.startswith("part-") for p in (out / "rows").iterdir())  # the temp file is gone
    assert json.loads((out / "_hqsam_run.json").read_text())["identity"]["box_source"] == "bbox"
    rows = read_rows(out)
    assert sorted(rows) == [10]  # the earlier run's rows of image 1 are gone
    assert_refined_like(rows[10], by_box.masks[0], by_box.scores[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_total"] == 1 and summary["images_resumed"] == 0
