"""Row identity end to end: an annotation is its position in the input, whatever its ids say.

Duplicate annotation ids each get their own mask in annotations.json and are reported; bad image
records leave their annotations a status while neighbours refine; Parquet rows that repeat an image
id are one task, so a resume skips nothing; an image with 10,000 boxes refines in bounded rows.
The chain runs in one process (`run_local`) with random vit_tiny weights; expected masks come from
a bare `BoxRefiner` with the same weights and pycocotools.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from hqsam.hqsam_core import BoxRefiner, build_hqsam, save_model
from hqsam.hqsam_core.testing.random_weights import randomize_
from hqsam.hqsam_core.zoo import sha256_file
from hqsam.jobs.cli import app
from hqsam.pipeline.manifest import MAX_ANNOTATIONS_PER_ROW, read_manifest
from hqsam.pipeline.out_tally import OutTally, count_out
from hqsam.pipeline.refine_masks import RefineMasks
from hqsam.pipeline.refine_pipeline import RefineSettings, refine_stages
from hqsam.pipeline.refine_run import RefineConfig
from hqsam.pipeline.refine_summary import account, summary_lines
from hqsam.pipeline.stage import Stage, run_local
from hqsam.pipeline.stream_coco import stream_coco
from hqsam.pipeline.write_coco import OutputMismatchError, write_coco
from hqsam.schemas.manifest import PARQUET_MANIFEST
from hqsam.schemas.refined import REFINED_ANNOTATION
from tests.conftest import unwritten_tasks

W, H = 64, 48


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random vit_tiny weights whose masks on the small test images are neither empty nor full."""
    path = tmp_path_factory.mktemp("weights") / "tiny_seed28.pth"
    with torch.random.fork_rng():
        torch.manual_seed(28)  # the prompt encoder's random Fourier features are drawn at build
        save_model(randomize_(build_hqsam("vit_tiny"), seed=28), str(path))
    return path


@pytest.fixture(scope="module")
def settings(checkpoint: Path) -> RefineSettings:
    # One image per refine call, as the bare refiner is called below: the same float operations.
    return RefineSettings("vit_tiny", str(checkpoint), None, "cpu", batch_size=1, images_per_file=1)


@pytest.fixture(scope="module")
def bare(checkpoint: Path) -> BoxRefiner:
    return BoxRefiner(build_hqsam("vit_tiny", str(checkpoint)), "cpu")


def texture(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(base, np.ones((8, 8, 1), np.uint8))[:height, :width])


def write_images(root: Path, names: dict[str, int]) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    pixels = {name: texture(H, W, seed) for name, seed in names.items()}
    for name, array in pixels.items():
        Image.fromarray(array).save(root / name)
    return pixels


def xyxy(box: list[float]) -> list[float]:
    x, y, w, h = box
    return [x, y, x + w, y + h]


def refine_locally(rows: list[dict], out: Path, settings: RefineSettings, *probes: Stage) -> list[dict]:
    stages = refine_stages(str(out), settings)
    return list(run_local(rows, [*stages[:3], *probes, *stages[3:]]))


def written(out: Path) -> list[dict]:
    """Every row of OUT's parts, in input order; fails on an annotation written twice."""
    tables = [pq.read_table(p) for p in sorted((out / "rows").glob("part-*.parquet"))]
    assert all(table.schema.equals(REFINED_ANNOTATION) for table in tables)
    rows = sorted(pa.concat_tables(tables).to_pylist(), key=lambda row: row["ann_index"])
    positions = [row["ann_index"] for row in rows]
    assert len(positions) == len(set(positions)), "an annotation has more than one row"
    return rows


def rle_mask(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode()}).astype(bool)


def expected_masks(bare: BoxRefiner, pixels: np.ndarray, boxes: list[list[float]]) -> list[np.ndarray]:
    (result,) = bare.refine([pixels], [np.array([xyxy(box) for box in boxes], np.float32)])
    assert all(mask.any() and not mask.all() for mask in result.masks)
    return list(result.masks)


def assert_own_masks(rows: dict[int, dict], bare: BoxRefiner, pixels, boxes_at: dict[int, list]) -> None:
    """Rows at these positions are ok with the bare refiner's masks of their own boxes (one image)."""
    positions = sorted(boxes_at)
    for position, mask in zip(positions, expected_masks(bare, pixels, [boxes_at[p] for p in positions])):
        row = rows[position]
        assert row["status"] == "ok" and row["error"] is None, row
        np.testing.assert_array_equal(rle_mask(row["segmentation"]), mask)
        assert row["area"] == int(mask.sum())


# ---------------------------------------------------------------- duplicate annotation ids

BOXES = {"A": [4, 4, 30, 20], "B": [10, 8, 40, 30], "C": [30, 20, 30, 25], "D": [2, 2, 20, 20]}


def duplicate_id_dataset(root: Path) -> tuple[Path, dict, dict[str, np.ndarray]]:
    pixels = write_images(root, {"a.png": 1, "b.png": 2})
    annotations = [  # position: id, image, box (id 7 three times, across both images)
        {"id": 7, "image_id": 1, "bbox": BOXES["A"]},
        {"id": 7, "image_id": 2, "bbox": BOXES["B"]},
        {"id": 7, "image_id": 1, "bbox": BOXES["C"]},
        {"id": 8, "image_id": 2, "bbox": BOXES["D"]},
        {"id": 8, "image_id": 3, "bbox": BOXES["D"]},  # no image record
    ]
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "b.png", "width": W, "height": H},
        ],
        "annotations": [
            a | {"category_id": 1, "iscrowd": 0, "segmentation": [], "area": 0} for a in annotations
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = root / "coco.json"
    path.write_text(json.dumps(coco))
    return path, coco, pixels


def assert_refined_by_position(refined: dict, coco: dict, rows: list[dict], bare, pixels) -> None:
    """annotations.json: the input's annotations in order, each with the row at its position."""
    assert [(a["id"], a["image_id"]) for a in refined["annotations"]] == [
        (a["id"], a["image_id"]) for a in coco["annotations"]
    ]
    by_position = {row["ann_index"]: row for row in rows}
    assert sorted(by_position) == list(range(5))
    statuses = [a["hqsam"]["status"] for a in refined["annotations"]]
    assert statuses == ["ok", "ok", "ok", "ok", "image_missing"]
    for position, annotation in enumerate(refined["annotations"][:4]):
        row = by_position[position]
        assert annotation["segmentation"] == row["segmentation"] and annotation["area"] == row["area"]
        assert annotation["bbox"] == row["bbox"] and annotation["hqsam"]["score"] == row["score"]
    assert refined["annotations"][4]["segmentation"] == [] and refined["annotations"][4]["hqsam"]["error"]
    assert_own_masks(by_position, bare, pixels["a.png"], {0: BOXES["A"], 2: BOXES["C"]})
    assert_own_masks(by_position, bare, pixels["b.png"], {1: BOXES["B"], 3: BOXES["D"]})
    first, third = (rle_mask(by_position[p]["segmentation"]) for p in (0, 2))
    assert not np.array_equal(first, third)  # the two id-7 annotations of image 1 differ


def tally(folder, out: Path) -> OutTally:
    """What OUT holds of the task folder's annotations, as the run's tally counts it."""
    return count_out(folder.parts, str(out), folder.positions)[0]


def square_rle(x0: int, y0: int, x1: int, y1: int) -> dict:
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": rle["counts"].decode()}


def test_write_coco_gives_each_duplicate_id_the_row_at_its_position(settings, tmp_path) -> None:
    path, coco, _ = duplicate_id_dataset(tmp_path / "data")
    tasks = read_manifest(str(path)).tasks
    assert [t["ann_indices"] for t in tasks.to_pylist()] == [[0, 2], [1, 3], [4]]
    out = tmp_path / "out"
    (out / "rows").mkdir(parents=True)
    rows = []
    for position, annotation in enumerate(coco["annotations"]):
        ok = position < 4
        rle = square_rle(position, position, 10 + 3 * position, 8 + 2 * position) if ok else None
        rows.append(
            {"image_id": annotation["image_id"], "annotation_id": annotation["id"], "ann_index": position}
            | {
                "segmentation": rle,
                "area": int(mask_utils.area({**rle, "counts": rle["counts"].encode()})) if ok else None,
            }
            | {"bbox": [float(position)] * 4 if ok else None, "score": 0.5 + position / 8 if ok else None}
            | {"status": "ok" if ok else "image_missing", "error": None if ok else "no image record"}
            | {"model": "vit_tiny"}
        )
    # one part per task row, as the sink writes them (rows of one image in one part)
    for name, positions in [("a", [0, 2]), ("b", [1, 3]), ("c", [4])]:
        table = pa.Table.from_pylist([rows[p] for p in positions], schema=REFINED_ANNOTATION)
        pq.write_table(table, out / "rows" / f"part-{name}.parquet")

    write_coco(str(path), str(out))
    refined = json.loads((out / "annotations.json").read_text())
    assert [(a["id"], a["image_id"]) for a in refined["annotations"]] == [
        (a["id"], a["image_id"]) for a in coco["annotations"]
    ]
    for position, annotation in enumerate(refined["annotations"][:4]):
        row = rows[position]
        assert annotation["segmentation"] == row["segmentation"] and annotation["area"] == row["area"]
        assert annotation["bbox"] == row["bbox"] and annotation["hqsam"]["score"] == row["score"]
        assert annotation["hqsam"]["status"] == "ok"
    assert len({json.dumps(a["segmentation"]) for a in refined["annotations"][:4]}) == 4
    last = refined["annotations"][4]
    assert (
        last["hqsam"]["status"] == "image_missing"
        and last["segmentation"] == []
        and last["bbox"] == BOXES["D"]
    )

    config = RefineConfig(str(path), str(out), settings=settings, max_error_rate=1.0)
    folder = stream_coco(str(path), str(tmp_path / "tasks"))
    fresh = OutTally.nothing_written(folder)
    summary = account(config, folder, fresh, tally(folder, out), 1.0, sha256_file(settings.checkpoint))
    assert summary["duplicate_annotation_ids"] == {"ids": 2, "annotations": 5, "examples": [7, 8]}
    assert summary["complete"] and summary["annotations_written"] == 5
    assert summary["annotations_written_twice"] == 0
    assert summary["images_total"] == 3 and summary["errors"] == {"image_missing": 1}
    lines = summary_lines(summary)
    assert lines[-1].startswith("summary") and any(
        line.startswith("duplicate ids") and "5 annotations" in line and "7, 8" in line for line in lines
    )

    # A row copied in twice (another part with the same position) is counted once, and flagged.
    pq.write_table(pa.Table.from_pylist(rows[:1], schema=REFINED_ANNOTATION), out / "rows" / "part-z.parquet")
    again = account(config, folder, fresh, tally(folder, out), 1.0, sha256_file(settings.checkpoint))
    assert again["annotations_written"] == 5 and again["annotations_written_twice"] == 1
    assert not again["complete"] and again["errors"] == {"image_missing": 1}
    assert any(line.startswith("written twice") for line in summary_lines(again))


def test_write_coco_refuses_the_rows_of_another_annotation_file(settings, tmp_path) -> None:
    path, coco, _ = duplicate_id_dataset(tmp_path / "data")
    out = tmp_path / "out"
    (out / "rows").mkdir(parents=True)
    rows = [
        {"image_id": 2, "annotation_id": 7, "ann_index": 0, "status": "image_missing", "model": "vit_tiny"}
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=REFINED_ANNOTATION), out / "rows" / "part-a.parquet")
    with pytest.raises(OutputMismatchError) as refused:
        write_coco(str(path), str(out))
    message = str(refused.value)
    assert "\n" not in message and "annotation #0 of image 2" in message and "coco.json" in message
    assert not (out / "annotations.json").exists()


@pytest.mark.slow
def test_the_cli_reports_duplicate_ids_in_its_last_lines_and_summary(ray_session, settings, bare, tmp_path):
    path, coco, pixels = duplicate_id_dataset(tmp_path / "data")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["refine", str(path), "--out", str(out), "--format", "coco", "--checkpoint", settings.checkpoint]
        + ["--device", "cpu", "--no-progress", "--batch-size", "1", "--max-error-rate", "1"],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["duplicate_annotation_ids"] == {"ids": 2, "annotations": 5, "examples": [7, 8]}
    assert summary["complete"] and summary["annotations_written"] == summary["annotations_total"] == 5
    last = result.stdout.strip().splitlines()[-3:]
    assert any(line.startswith("duplicate ids") and "7, 8" in line for line in last), result.stdout
    refined = json.loads((out / "annotations.json").read_text())
    assert_refined_by_position(refined, coco, written(out), bare, pixels)


# ---------------------------------------------------------------- a bad record is its rows' status


@pytest.mark.slow
def test_an_image_record_without_file_name_fails_its_rows_and_neighbours_refine(settings, bare, tmp_path):
    pixels = write_images(tmp_path / "data", {"a.png": 3, "c.png": 4})
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "width": W, "height": H},  # no file_name
            {"id": 3, "file_name": "c.png", "width": W, "height": H},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": BOXES["A"]},
            {"id": 2, "image_id": 2, "bbox": BOXES["A"]},
            {"id": 3, "image_id": 3, "bbox": BOXES["B"]},
            {"id": 4, "image_id": 1, "bbox": BOXES["C"]},
        ],
    }
    path = tmp_path / "data" / "coco.json"
    path.write_text(json.dumps(coco))
    refine_locally(read_manifest(str(path)).tasks.to_pylist(), tmp_path / "out", settings)
    rows = {row["ann_index"]: row for row in written(tmp_path / "out")}
    assert len(rows) == 4 and rows[1]["status"] == "image_missing" and rows[1]["image_id"] == 2
    assert "image_id 2" in rows[1]["error"] and rows[1]["segmentation"] is None
    assert_own_masks(rows, bare, pixels["a.png"], {0: BOXES["A"], 3: BOXES["C"]})
    assert_own_masks(rows, bare, pixels["c.png"], {2: BOXES["B"]})


@pytest.mark.slow
def test_a_null_image_uri_fails_its_rows_and_repeated_image_ids_are_one_image(settings, bare, tmp_path):
    pixels = write_images(tmp_path / "data", {"a.png": 5, "c.png": 6})

    def annotations(*pairs):
        return [
            {"id": i, "category_id": 1, "bbox": BOXES[box], "segmentation": None, "iscrowd": 0}
            for i, box in pairs
        ]

    manifest = [
        {"image_id": 1, "image_uri": "a.png", "width": W, "height": H, "annotations": annotations((1, "A"))},
        {"image_id": 2, "image_uri": None, "width": W, "height": H, "annotations": annotations((2, "B"))},
        {"image_id": 1, "image_uri": "a.png", "width": W, "height": H, "annotations": annotations((3, "C"))},
        {"image_id": 3, "image_uri": "c.png", "width": W, "height": H, "annotations": annotations((4, "D"))},
    ]
    path = tmp_path / "data" / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(manifest, schema=PARQUET_MANIFEST), path)
    tasks = read_manifest(str(path)).tasks
    assert tasks["image_id"].to_pylist() == [1, 2, 3]  # image 1's two rows are one task
    returned = refine_locally(tasks.to_pylist(), tmp_path / "out", settings)
    assert [row["image_id"] for row in returned] == [1, 2, 3]
    assert (
        len(list((tmp_path / "out" / "rows").glob("part-*.parquet"))) == 3
    )  # one part per task, none shared
    rows = {row["ann_index"]: row for row in written(tmp_path / "out")}
    assert len(rows) == 4 and rows[1]["status"] == "image_missing" and rows[1]["image_uri"] is None
    assert_own_masks(rows, bare, pixels["a.png"], {0: BOXES["A"], 2: BOXES["C"]})
    assert_own_masks(rows, bare, pixels["c.png"], {3: BOXES["D"]})


# ---------------------------------------------------------------- resume per task row


def resume_manifest(root: Path) -> tuple[Path, int]:
    """Image 1 in two manifest rows (positions 0, 1 and the last), image 2 with more annotations
    than a task row holds: crowd regions (passed through, not refined) but for its last one."""
    many = MAX_ANNOTATIONS_PER_ROW + 4

    def annotations(first, count, box="A", crowd=0):
        return [
            {"id": first + k, "category_id": 1, "bbox": BOXES[box], "segmentation": None}
            | {"iscrowd": crowd if k < count - 1 else 0}
            for k in range(count)
        ]

    manifest = [
        {"image_id": 1, "image_uri": "a.png", "width": W, "height": H, "annotations": annotations(0, 2)},
        {"image_id": 2, "image_uri": "b.png", "width": W, "height": H}
        | {"annotations": annotations(10, many, "B", crowd=1)},
        {"image_id": 1, "image_uri": "a.png", "width": W, "height": H, "annotations": annotations(5, 1, "C")},
    ]
    path = root / "manifest.parquet"
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(manifest, schema=PARQUET_MANIFEST), path)
    return path, many


def test_resume_skips_no_row_of_a_repeated_image_id_or_a_split_image(tmp_path) -> None:
    """Parts of some task rows in OUT: the resumed rows are exactly the others, by position."""
    path, many = resume_manifest(tmp_path / "data")
    tasks = read_manifest(str(path)).tasks
    assert [(t["image_id"], len(t["ann_ids"])) for t in tasks.to_pylist()] == [(1, 3), (2, 256), (2, 4)]
    total = set(range(3 + many))
    for done_rows in ([0], [1], [2], [0, 2], [0, 1, 2]):
        out = tmp_path / f"out{done_rows}"
        (out / "rows").mkdir(parents=True)
        for k in done_rows:  # one part per task row, as a run killed after writing them leaves
            task = tasks.slice(k, 1).to_pylist()[0]
            rows = [
                {"image_id": task["image_id"], "annotation_id": ann_id, "ann_index": position}
                | {"status": "crowd_skipped", "model": "vit_tiny"}
                for ann_id, position in zip(task["ann_ids"], task["ann_indices"])
            ]
            pq.write_table(
                pa.Table.from_pylist(rows, schema=REFINED_ANNOTATION), out / "rows" / f"part-{k}.parquet"
            )
        remaining = unwritten_tasks(tasks, out)
        assert remaining.to_pylist() == [t for k, t in enumerate(tasks.to_pylist()) if k not in done_rows]
        done = {row["ann_index"] for row in written(out)} if done_rows else set()
        todo = {p for row in remaining.to_pylist() for p in row["ann_indices"]}
        assert not done & todo and done | todo == total


@pytest.mark.slow
def test_a_killed_run_of_repeated_image_ids_and_split_images_resumes_every_row_once(settings, tmp_path):
    """The real chain, killed after one part (twice), then resumed: every annotation once, as in an
    uninterrupted run."""
    write_images(tmp_path / "data", {"a.png": 7, "b.png": 8})
    path, many = resume_manifest(tmp_path / "data")
    tasks = read_manifest(str(path)).tasks
    refine_locally(tasks.to_pylist(), tmp_path / "uninterrupted", settings)
    want = written(tmp_path / "uninterrupted")
    out = tmp_path / "out"
    for k in (0, 1):  # killed after writing the part of task row k
        refine_locally(tasks.slice(k, 1).to_pylist(), out, settings)
        remaining = unwritten_tasks(tasks, out)
        assert remaining.to_pylist() == tasks.slice(k + 1).to_pylist()
    refine_locally(remaining.to_pylist(), out, settings)
    rows = written(out)
    assert [row["ann_index"] for row in rows] == list(range(3 + many))
    assert [row["annotation_id"] for row in rows] == [0, 1, *range(10, 10 + many), 5]
    assert [row["status"] for row in rows].count("ok") == 4 and unwritten_tasks(tasks, out).num_rows == 0
    assert len(list((out / "rows").glob("part-*.parquet"))) == 3
    for got, expected in zip(rows, want):
        for key in ("image_id", "status", "segmentation", "bbox", "area", "error"):
            assert got[key] == expected[key], (got["ann_index"], key)


# ---------------------------------------------------------------- 10,000 boxes on one image


class PeakRow(Stage):
    """Records the size of every row's packed masks as it leaves RefineMasks."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def process(self, rows: list[dict]) -> list[dict]:
        for row in rows:
            self.seen.append((len(row["ann_ids"]), np.asarray(row["packed_masks"]).nbytes))
        return rows


@pytest.mark.slow
def test_ten_thousand_boxes_on_one_image_refine_in_bounded_rows(settings, tmp_path) -> None:
    # Every prompt costs a SAM decoder pass (about 0.1 s on a CPU core), so only the first 300
    # boxes are refined; the others are crowd regions that still travel the whole chain as rows.
    boxes, refined = 10_000, 300
    write_images(tmp_path / "data", {"a.png": 9, "b.png": 10})
    rng = np.random.default_rng(0)
    corners = rng.integers(0, [W - 3, H - 3], size=(boxes, 2))
    annotations = [
        {
            "id": k,
            "image_id": 1,
            "category_id": 1,
            "bbox": [int(x), int(y), 3, 3],
            "iscrowd": int(k >= refined),
        }
        for k, (x, y) in enumerate(corners)
    ]
    annotations.insert(5000, {"id": -1, "image_id": 2, "category_id": 1, "bbox": BOXES["A"], "iscrowd": 0})
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "b.png", "width": W, "height": H},
        ],
        "annotations": annotations,
    }
    path = tmp_path / "data" / "coco.json"
    path.write_text(json.dumps(coco))
    tasks = read_manifest(str(path)).tasks
    chunks = math.ceil(boxes / MAX_ANNOTATIONS_PER_ROW)
    assert tasks.num_rows == chunks + 1
    assert [len(ids) for ids in tasks["ann_ids"].to_pylist()] == [MAX_ANNOTATIONS_PER_ROW] * (chunks - 1) + [
        boxes - MAX_ANNOTATIONS_PER_ROW * (chunks - 1),
        1,
    ]

    wide = RefineSettings("vit_tiny", settings.checkpoint, None, "cpu", batch_size=2, max_prompts=64)
    peak = PeakRow()
    returned = refine_locally(tasks.to_pylist(), tmp_path / "out", wide, peak)
    assert sum(len(row["statuses"]) for row in returned) == boxes + 1
    mask_bytes = math.ceil(W * H / 8)
    assert len(peak.seen) == chunks + 1
    assert max(count for count, _ in peak.seen) == MAX_ANNOTATIONS_PER_ROW
    assert max(nbytes for _, nbytes in peak.seen) == MAX_ANNOTATIONS_PER_ROW * mask_bytes

    rows = written(tmp_path / "out")  # each annotation once
    assert [row["ann_index"] for row in rows] == list(range(boxes + 1))
    assert [row["annotation_id"] for row in rows] == [a["id"] for a in annotations]
    statuses = [row["status"] for row in rows]
    assert statuses.count("ok") == refined + 1 and statuses.count("crowd_skipped") == boxes - refined
    for row in rows[:refined:37]:
        assert (
            list(row["segmentation"]["size"]) == [H, W] and row["area"] == rle_mask(row["segmentation"]).sum()
        )


def test_batch_size_has_an_upper_bound(tmp_path) -> None:
    result = CliRunner().invoke(
        app, ["refine", str(tmp_path / "coco.json"), "--out", str(tmp_path / "out"), "--batch-size", "65"]
    )
    assert result.exit_code == 2 and "--batch-size" in result.output + result.stderr, result.output
    assert not (tmp_path / "out").exists()
    assert RefineMasks(RefineSettings("vit_tiny", "x", None, "cpu", batch_size=64)).batch_size == 64
