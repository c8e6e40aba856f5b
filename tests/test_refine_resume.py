"""Resume after a real kill: `hqsam refine` SIGKILLed mid-run, then --resume, ends with an
uninterrupted run's rows - every annotation exactly once, same statuses, same masks. And the OUT
policy and accounting of pipeline/refine_run.py on their own, without Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hqsam.hqsam_core import build_hqsam, save_model
from hqsam.hqsam_core.errors import HqsamError
from hqsam.hqsam_core.testing.random_weights import randomize_
from hqsam.jobs.cli import app
from hqsam.pipeline.manifest import read_manifest
from hqsam.pipeline.out_folder import OldOutputLayoutError, OutputNotEmptyError, check_out, prepare_out
from hqsam.pipeline.refine_pipeline import RefineSettings
from hqsam.pipeline.refine_run import (
    RefineConfig,
    run_refine,
    with_absolute_paths,
)
from hqsam.pipeline.refine_summary import exit_code, summary_lines
from hqsam.pipeline.write_leftovers import write_crashed
from hqsam.pipeline.write_parquet import write_atomically
from hqsam.schemas.refined import REFINED_ANNOTATION
from tests.conftest import ROOT, kill_session, unwritten_tasks

IMAGES = 10  # Ray blocks hold 8 images: parts appear after the 8th, the run ends after the 10th
BATCH, PER_FILE = 2, 2


def write_dataset(root: Path) -> Path:
    """IMAGES small PNGs, two annotations each (one with a polygon), and their COCO file."""
    root.mkdir()
    rng = np.random.default_rng(5)
    images, annotations = [], []
    for image_id in range(IMAGES):
        base = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        Image.fromarray(np.kron(base, np.ones((8, 8, 1), np.uint8))).save(root / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 64, "height": 48})
        polygon = [[4.0, 4.0, 34.0, 4.0, 30.0, 26.0, 6.0, 22.0]]
        annotations += [
            {"id": 2 * image_id, "image_id": image_id, "category_id": 1, "bbox": [4, 4, 30, 22]}
            | {"segmentation": polygon, "iscrowd": 0},
            {"id": 2 * image_id + 1, "image_id": image_id, "category_id": 1, "bbox": [30, 20, 50, 40]}
            | {"iscrowd": int(image_id % 5 == 0)},  # a few crowd rows, and boxes partly outside
        ]
    path = root / "coco.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1}]}))
    return path


def rows_by_id(out: Path) -> dict[int, dict]:
    tables = [pq.read_table(p) for p in sorted((out / "rows").glob("part-*.parquet"))]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    ids = [row["annotation_id"] for row in rows]
    assert len(ids) == len(set(ids)), "an annotation has more than one row"
    return {row["annotation_id"]: row for row in rows}


def same_rows(got: dict[int, dict], want: dict[int, dict]) -> None:
    assert sorted(got) == sorted(want) == list(range(2 * IMAGES))
    for ann_id, row in want.items():
        other = got[ann_id]
        for key in ("image_id", "status", "error", "segmentation", "bbox", "area", "category_id"):
            assert other[key] == row[key], (ann_id, key)
        for key in ("score", "iou_vs_original", "boundary_iou_vs_original"):
            assert (other[key] is None) == (row[key] is None), (ann_id, key)
            if row[key] is not None:
                assert other[key] == pytest.approx(row[key], abs=1e-5), (ann_id, key)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random vit_tiny weights whose masks on these small images are neither empty nor full."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_seed5.pth"
    # The prompt encoder's Fourier features are drawn at build from torch's global generator, which
    # torch seeds at random per process: fix it to a state whose masks here are not all full.
    with torch.random.fork_rng():
        torch.manual_seed(67280421310721)
        model = randomize_(build_hqsam("vit_tiny"), seed=5)
    save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def uninterrupted(ray_session, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("resume")
    path = write_dataset(root / "data")
    out = root / "uninterrupted"
    settings = RefineSettings(
        "vit_tiny", str(checkpoint), None, "cpu", BATCH, images_per_file=PER_FILE, torch_threads=1
    )
    summary = run_refine(RefineConfig(str(path), str(out), settings=settings), progress=False)
    assert summary["complete"] and summary["images_resumed"] == 0
    return path, out


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_rows(uninterrupted, checkpoint: Path, tmp_path) -> None:
    path, reference = uninterrupted
    want = rows_by_id(reference)
    assert {row["status"] for row in want.values()} == {"ok", "crowd_skipped"}
    assert any(0 < row["area"] < 64 * 48 for row in want.values() if row["status"] == "ok")

    out = tmp_path / "out"
    command = [sys.executable, "-m", "hqsam.jobs.cli", "refine", str(path), "--out", str(out)]
    command += ["--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress"]
    command += ["--batch-size", str(BATCH), "--images-per-file", str(PER_FILE), "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    log = tmp_path / "killed.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 400
        while not list((out / "rows").glob("part-*.parquet")):
            assert process.poll() is None, f"the run ended before writing a part:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no part file after 400 s"
            time.sleep(0.02)
        assert process.poll() is None, "the run finished before the kill"
    finally:
        kill_session(process)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    assert (out / "_hqsam_lease.json").exists()  # the killed run's: taken over at once (its pid is gone)
    partial = rows_by_id(out)
    assert 0 < len(partial) < 2 * IMAGES
    # What a kill in the middle of a write leaves behind: a temp file readers must ignore.
    (out / "rows" / ".part-0123456789abcdef.parquet.tmp").write_bytes(b"PAR1 half a file")

    result = CliRunner().invoke(
        app,
        ["refine", str(path), "--out", str(out), "--checkpoint", str(checkpoint)]
        + ["--device", "cpu", "--no-progress", "--resume", "--batch-size", str(BATCH), "--threads", "1"],
    )
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    assert not (out / "_hqsam_lease.json").exists()  # released at the end
    summary = json.loads((out / "summary.json").read_text())
    done_images = len({row["image_id"] for row in partial.values()})
    assert summary["images_resumed"] == done_images > 0
    assert summary["annotations_total"] == summary["annotations_written"] == 2 * IMAGES
    assert summary["complete"]
    same_rows(rows_by_id(out), want)
    assert not list((out / "rows").glob(".*"))  # the killed writer's temp file is gone: polars reads rows/


@pytest.mark.slow
def test_resume_of_a_finished_run_refines_nothing(uninterrupted, checkpoint: Path) -> None:
    path, out = uninterrupted
    before = {p.name: p.read_bytes() for p in (out / "rows").glob("part-*.parquet")}
    rows = rows_by_id(out)
    settings = RefineSettings("vit_tiny", str(checkpoint), None, "cpu", batch_size=BATCH)
    summary = run_refine(RefineConfig(str(path), str(out), settings=settings, resume=True), progress=False)
    assert summary["images_resumed"] == summary["images_total"] == IMAGES
    assert summary["annotations_per_s"] == 0 and summary["complete"]
    assert {p.name: p.read_bytes() for p in (out / "rows").glob("part-*.parquet")} == before
    same_rows(rows_by_id(out), rows)


@pytest.mark.slow
def test_resume_refines_the_rows_written_as_worker_crashed_again(uninterrupted, checkpoint, tmp_path) -> None:
    path, reference = uninterrupted
    want = rows_by_id(reference)
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    settings = RefineSettings(
        "vit_tiny", str(checkpoint), None, "cpu", BATCH, images_per_file=PER_FILE, torch_threads=1
    )
    # Two images whose workers died on every try: their parts hold WORKER_CRASHED rows instead.
    first = sorted((out / "rows").glob("part-*.parquet"))[0]
    lost = set(pq.read_table(first, columns=["ann_index"])["ann_index"].to_pylist())
    first.unlink()
    tasks = read_manifest(str(path)).tasks
    missing = unwritten_tasks(tasks, out)
    assert set(pc.list_flatten(missing["ann_indices"]).to_pylist()) == lost
    write_crashed(missing, str(out), settings, "the worker died")
    crashed = rows_by_id(out)
    assert sorted(crashed) == list(range(2 * IMAGES))
    assert {crashed[ann]["status"] for ann in crashed if crashed[ann]["ann_index"] in lost} == {
        "worker_crashed"
    }

    summary = run_refine(RefineConfig(str(path), str(out), settings=settings, resume=True), progress=False)
    assert summary["images_resumed"] == IMAGES - missing.num_rows and summary["complete"]
    assert summary["annotations_written"] == 2 * IMAGES and "worker_crashed" not in summary["errors"]
    same_rows(rows_by_id(out), want)  # exactly one row per annotation, refined as uninterrupted


# ---------------------------------------------------------------- OUT policy and accounting, no Ray


def test_out_is_made_refused_resumed_or_cleared_of_hqsams_files_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_out(str(out), resume=False, overwrite=False)
    assert out.is_dir() and not list(out.iterdir())
    prepare_out(str(out), resume=False, overwrite=False)  # still empty: nothing to refuse

    rows = out / "rows"
    rows.mkdir()
    parts = ["part-0a1b.parquet", "part-crashed-2c3d.parquet"]  # crashed: rows write_leftovers wrote
    temps = [".part-0a1b.parquet.5e6f.tmp"]  # a killed writer's
    ours = ["annotations.json", ".annotations.json.77.tmp", "summary.json"]
    theirs = ["notes.txt", "partial.parquet", "sub"]
    for name in parts + temps:
        (rows / name).write_bytes(b"x")
    for name in ours + theirs[:2]:
        (out / name).write_bytes(b"x")
    (out / "sub").mkdir()
    with pytest.raises(OutputNotEmptyError) as refused:
        prepare_out(str(out), resume=False, overwrite=False)
    message = str(refused.value)
    assert refused.value.exit_code == 2 and "\n" not in message
    assert "not empty" in message and "--resume" in message and "--overwrite" in message
    prepare_out(str(out), resume=True, overwrite=False)
    # resumed: all kept but the temp files and the unrefined rows' parts, refined again by the run
    assert sorted(p.name for p in out.iterdir()) == sorted(ours + theirs + ["rows"])
    assert [p.name for p in rows.iterdir()] == ["part-0a1b.parquet"]
    (rows / temps[0]).write_bytes(b"x")
    prepare_out(str(out), resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(theirs)  # only hqsam's files go


def test_resume_of_an_out_of_the_old_layout_is_refused_and_overwrite_clears_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("part-0a1b.parquet", "summary.json", "_hqsam_run.json"):  # parts directly in OUT
        (out / name).write_bytes(b"x")
    before = sorted(p.name for p in out.iterdir())
    for check in (check_out, prepare_out):
        with pytest.raises(OldOutputLayoutError) as refused:
            check(str(out), resume=True, overwrite=False)
        message = str(refused.value)
        assert isinstance(refused.value, HqsamError) and refused.value.exit_code == 2
        assert "\n" not in message and message.count(". ") == 0 and str(out) in message
        assert "--overwrite" in message and "--out" in message and "rows" in message
        assert sorted(p.name for p in out.iterdir()) == before  # refused before touching anything
    prepare_out(str(out), resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["_hqsam_run.json"]
    prepare_out(str(out), resume=True, overwrite=False)  # now of the new layout


def test_resume_refines_only_images_without_rows_in_out(tmp_path: Path) -> None:
    # A task row is known by its first annotation's input position (`ann_indices`), not its image id.
    positions = [[0, 1], [2], [3], [4, 5]]
    tasks = pa.table(
        {"image_id": pa.array([1, 2, 3, 4], pa.int64()), "ann_indices": positions, "n": [10, 20, 30, 40]}
    )
    assert unwritten_tasks(tasks, tmp_path / "absent").equals(tasks)
    rows = [
        {"image_id": image_id, "annotation_id": 10 * image_id + k, "ann_index": position}
        | {"status": "ok", "model": "vit_tiny"}
        for image_id, k, position in [(1, 0, 0), (1, 1, 1), (3, 0, 3)]
    ]
    table = pa.Table.from_pylist(rows, schema=REFINED_ANNOTATION)
    write_atomically(str(tmp_path / "rows" / "part-x.parquet"), table)
    (tmp_path / "rows" / ".part-y.parquet.1.tmp").write_bytes(
        b"PAR1 half a file"
    )  # a killed writer's: ignored
    assert unwritten_tasks(tasks, tmp_path).to_pydict() == {
        "image_id": [2, 4],
        "ann_indices": [[2], [4, 5]],
        "n": [20, 40],
    }


def test_exit_code_paths_and_summary_lines() -> None:
    summary = {"complete": True, "error_rate": 0.01, "max_error_rate": 0.01}
    assert exit_code(summary) == 0
    assert exit_code(summary | {"error_rate": 0.02}) == 1
    assert exit_code(summary | {"complete": False, "error_rate": 0.0}) == 1

    settings = RefineSettings("vit_tiny", "sam_hq_vit_tiny", "s3://bucket/head.pth", "cpu")
    config = with_absolute_paths(RefineConfig("data/coco.json", "out", images="~/pics", settings=settings))
    assert config.annotations == os.path.abspath("data/coco.json") and config.out == os.path.abspath("out")
    assert config.images == os.path.expanduser("~/pics")
    assert (
        config.settings.checkpoint == "sam_hq_vit_tiny" and config.settings.hq_head == "s3://bucket/head.pth"
    )
    assert with_absolute_paths(RefineConfig("s3://b/c.json", "gs://b/out")).out == "gs://b/out"

    lines = summary_lines(
        {
            "annotations_total": 3,
            "annotations_ok": 1,
            "errors": {"crowd_skipped": 1, "invalid_box": 1},
            "images_total": 2,
            "images_resumed": 1,
            "wall_time_s": 2.25,
            "annotations_per_s": 1.5,
            "images_per_s": 0.5,
            "error_rate": 1 / 3,
            "max_error_rate": 0.01,
            "out": "/data/out/",
        }
    )
    # labels padded to the longest ("  crowd_skipped"), two spaces, the value
    assert lines[:4] == [
        "annotations      3",
        "refined ok       1",
        "  crowd_skipped  1",
        "  invalid_box    1",
    ]
    assert lines[-2:] == ["rows             /data/out/rows/", "summary          /data/out/summary.json"]
    assert "error rate       0.3333 (max 0.01)" in lines and "wall time        2.2 s" in lines
