"""OUT safety of `hqsam refine` (issue 12): failed invocations leave no OUT, a second run into the same
OUT refuses, a resume checks that OUT holds the same job, listings on S3 are never stale, and
annotations.json is replaced whole or not at all. Local disks and S3 (moto's server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from hqsam.hqsam_core import build_hqsam, save_model, storage
from hqsam.hqsam_core.testing.random_weights import randomize_
from hqsam.jobs.cli import app
from hqsam.jobs.refine import report
from hqsam.pipeline import write_coco as write_coco_module
from hqsam.pipeline.out_folder import OutputNotEmptyError, prepare_out
from hqsam.pipeline.write_coco import write_coco
from tests.conftest import ROOT

W, H = 64, 48


def texture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(H // 8, W // 8, 3), dtype=np.uint8)
    return np.kron(base, np.ones((8, 8, 1), np.uint8))


def coco_of(images: int) -> dict:
    """`images` images of W x H, two annotations each (a bbox, and a polygon)."""
    polygon = [[6.0, 4.0, 40.0, 10.0, 20.0, 36.0]]
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in range(images)],
        "annotations": [
            {"id": 2 * i + k, "image_id": i, "category_id": 1, "bbox": [5 + 10 * k, 5, 30, 30]}
            | {"segmentation": polygon, "iscrowd": 0}
            for i in range(images)
            for k in range(2)
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }


def write_local_dataset(root: Path, images: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.fromarray(texture(40 + i)).save(root / f"{i}.png")
    path = root / "coco.json"
    path.write_text(json.dumps(coco_of(images)))
    return path


def refine_cli(*args: object):
    return CliRunner().invoke(
        app, ["refine", *map(str, args), "--device", "cpu", "--threads", "1", "--no-progress"]
    )


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.output, result.stderr, result.exception)
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def s3_names(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return sorted(name.rsplit("/", 1)[-1] for name in fs.find(prefix))
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------- item 10: --crop-zoom at the CLI


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5"])
def test_crop_zoom_outside_zero_to_one_is_refused_in_one_line(value, tiny_checkpoint, tmp_path) -> None:
    path = write_local_dataset(tmp_path / "data")
    out = tmp_path / "out"
    result = refine_cli(path, "--out", out, "--checkpoint", tiny_checkpoint, "--crop-zoom", value)
    assert "--crop-zoom" in one_line_error(result)
    assert not out.exists()


# ---------------------------------------------------------------- item 12: nothing made when a check fails


def test_failed_invocations_leave_no_out_behind(tiny_checkpoint, tmp_path) -> None:
    path = write_local_dataset(tmp_path / "data")
    garbage = tmp_path / "data" / "garbage.json"
    garbage.write_text('{"images": [')
    not_weights = tmp_path / "not_weights.pth"
    not_weights.write_bytes(b"these are not weights")
    cases = {
        "missing annotation file": (tmp_path / "absent.json", tiny_checkpoint, "does not exist"),
        "unparseable annotation file": (garbage, tiny_checkpoint, "garbage.json"),
        "missing checkpoint": (path, tmp_path / "absent.pth", "absent.pth"),
        "unreadable checkpoint": (path, not_weights, "not_weights.pth"),
    }
    for case, (annotation_file, checkpoint, named) in cases.items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        message = one_line_error(refine_cli(annotation_file, "--out", out, "--checkpoint", checkpoint))
        assert named in message, (case, message)
        assert not out.exists(), case


def test_failed_invocation_on_s3_leaves_no_object_in_out(s3_bucket, tiny_checkpoint, tmp_path) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.pipe(f"{s3_bucket}/ann/coco.json", b'{"images": [')
    out = f"s3://{s3_bucket}/out"
    result = refine_cli(f"s3://{s3_bucket}/ann/coco.json", "--out", out, "--checkpoint", tiny_checkpoint)
    one_line_error(result)
    assert s3_names(fs, f"{s3_bucket}/out") == []


def test_refused_out_is_left_as_it_was(tiny_checkpoint, tmp_path) -> None:
    path = write_local_dataset(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    (out / "theirs.txt").write_text("a user's file")
    message = one_line_error(refine_cli(path, "--out", out, "--checkpoint", tiny_checkpoint))
    assert "not empty" in message
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]


def test_out_holding_only_the_runs_bookkeeping_counts_as_empty(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    bookkeeping = ["_hqsam_run.json", "_hqsam_lease.json", "._hqsam_run.json.1a2b.tmp"]
    for name in bookkeeping:
        (out / name).write_text("{}")
    prepare_out(str(out), resume=False, overwrite=False)  # a run that failed before any output
    (out / "rows").mkdir()
    (out / "rows" / "part-0.parquet").write_bytes(b"rows")
    with pytest.raises(OutputNotEmptyError):
        prepare_out(str(out), resume=False, overwrite=False)
    prepare_out(str(out), resume=False, overwrite=True)  # the lease held by this run stays
    assert sorted(p.name for p in out.iterdir()) == sorted(bookkeeping)


# ---------------------------------------------------------------- item 7: never a negative count


def summary_of(total: int, written: int) -> dict:
    return {
        "annotations_total": total,
        "annotations_written": written,
        "annotations_ok": min(total, written),
        "errors": {},
        "error_rate": 0.0,
        "max_error_rate": 0.01,
        "images_total": 1,
        "images_resumed": 1,
        "wall_time_s": 1.0,
        "annotations_per_s": 0.0,
        "images_per_s": 0.0,
        "out": "/tmp/out",
        "complete": written == total,
    }


def test_report_never_prints_a_negative_missing_count(capsys) -> None:
    report(summary_of(total=4, written=6))
    printed = capsys.readouterr()
    assert "-2" not in printed.out + printed.err
    assert "no output row" not in printed.err
    report(summary_of(total=6, written=4))
    assert "2 annotations have no output row" in capsys.readouterr().err


# ---------------------------------------------------------------- item 4: annotations.json whole or not at all


@pytest.mark.parametrize("where", ["local", "s3"])
def test_annotations_json_is_never_replaced_by_a_truncated_file(
    where, request, tmp_path, monkeypatch
) -> None:
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        root = f"s3://{bucket}"
    else:
        root = str(tmp_path)
    coco = coco_of(300)
    annotations = storage.join(root, "in/coco.json")
    storage.write_bytes(annotations, json.dumps(coco).encode())
    out = storage.join(root, "out")  # no part files: every annotation is written as it came
    previous = b'{"images": [], "annotations": [], "note": "the previous, complete file"}'
    storage.write_bytes(storage.join(out, "annotations.json"), previous)

    # The writer fails at the last annotation, most of the file written (a full disk, a lost
    # connection): injected, since no input makes it fail any more (deep nesting is written).
    dump = write_coco_module._dumps_annotation

    def failing_at_the_last(annotation: dict, position: int) -> bytes:
        if position == len(coco["annotations"]) - 1:
            raise OSError("No space left on device")
        return dump(annotation, position)

    monkeypatch.setattr(write_coco_module, "_dumps_annotation", failing_at_the_last)
    with pytest.raises(OSError, match="No space"):
        write_coco(annotations, out)
    assert storage.read_bytes(storage.join(out, "annotations.json")) == previous
    names = [uri.rsplit("/", 1)[-1] for uri in storage.list_folder(out)]
    assert names == ["annotations.json"]  # no temp file left behind


def test_a_failed_object_store_write_commits_nothing(s3_bucket) -> None:
    uri = f"s3://{s3_bucket}/out/annotations.json"
    storage.write_bytes(uri, b"whole")
    with pytest.raises(RuntimeError), storage.atomic_writer(uri) as handle:
        handle.write(b"the first half of a new file")
        raise RuntimeError("the writer failed part-way")
    assert storage.read_bytes(uri) == b"whole"


# ---------------------------------------------------------------- end to end on a real local Ray


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, Path]:
    """Two different random vit_tiny checkpoints."""
    root = tmp_path_factory.mktemp("weights")
    paths = root / "a.pth", root / "b.pth"
    for seed, path in zip((5, 6), paths):
        save_model(randomize_(build_hqsam("vit_tiny"), seed=seed), str(path))
    return paths


def s3_dataset(fs, bucket: str, images: int) -> str:
    for i in range(images):
        fs.pipe(f"{bucket}/data/{i}.png", _png(texture(40 + i)))
    fs.pipe(f"{bucket}/data/coco.json", json.dumps(coco_of(images)).encode())
    return f"s3://{bucket}/data/coco.json"


def _png(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


# A driver of its own: its Ray workers inherit the S3 settings, and it lists OUT (through fsspec's
# shared, caching instance and in the run itself) before its workers write.
RUN_THEN_RESUME = """
import json, sys
import s3fs
from hqsam.pipeline.refine_pipeline import RefineSettings
from hqsam.pipeline.refine_run import RefineConfig, run_refine

annotations, out, checkpoint = sys.argv[1:]
settings = RefineSettings("vit_tiny", checkpoint, None, "cpu", batch_size=1, torch_threads=1)
first = run_refine(RefineConfig(annotations, out, settings=settings, limit=1), progress=False)
s3fs.S3FileSystem().ls(out)
config = RefineConfig(annotations, out, settings=settings, resume=True, format="coco")
print(json.dumps([first, run_refine(config, progress=False)]))
"""


@pytest.mark.slow
def test_s3_resume_in_a_process_that_listed_out_before_the_workers_wrote(s3_bucket, weights) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    annotations = s3_dataset(fs, s3_bucket, images=3)
    out = f"s3://{s3_bucket}/out"
    command = [sys.executable, "-c", RUN_THEN_RESUME, annotations, out, str(weights[0])]
    env = os.environ | {"RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    first, summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert first["complete"] and first["annotations_written"] == 2
    assert summary["images_resumed"] == 1 and summary["images_total"] == 3
    assert summary["annotations_total"] == summary["annotations_written"] == 6
    assert summary["complete"]
    refined = json.loads(storage.read_bytes(f"{out}/annotations.json"))
    assert [a["hqsam"]["status"] for a in refined["annotations"]] == ["ok"] * 6

    # item 8: a resume must be the same job, whatever the throughput knobs. Its count of OUT runs in
    # a Ray worker, which reads OUT on S3: a Ray this test process started before the S3 settings
    # (an earlier test's) has workers without them, so the run starts a Ray of its own.
    import ray

    ray.shutdown()
    same_job = refine_cli(
        annotations, "--out", out, "--checkpoint", weights[0], "--resume", "--batch-size", "3"
    )
    assert same_job.exit_code == 0, (same_job.output, same_job.stderr, same_job.exception)
    for args, named in [
        (["--checkpoint", weights[1]], "checkpoint"),
        (["--checkpoint", weights[0], "--box-source", "segmentation"], "box_source"),
        (["--checkpoint", weights[0], "--hq-token-only"], "hq_token_only"),
        (["--checkpoint", weights[0], "--crop-zoom", "0.5"], "crop_zoom"),
    ]:
        message = one_line_error(refine_cli(annotations, "--out", out, "--resume", *args))
        assert named in message and "--overwrite" in message, message
    other_input = coco_of(3)
    other_input["annotations"][0]["bbox"] = [1, 1, 9, 9]
    fs.pipe(f"{s3_bucket}/data/coco.json", json.dumps(other_input).encode())
    message = one_line_error(refine_cli(annotations, "--out", out, "--resume", "--checkpoint", weights[0]))
    assert "annotations" in message, message
    assert "_hqsam_lease.json" not in s3_names(fs, f"{s3_bucket}/out")


@pytest.mark.slow
def test_two_runs_into_one_out_at_once_one_refuses(weights, tmp_path) -> None:
    path = write_local_dataset(tmp_path / "data", images=1)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "hqsam.jobs.cli", "refine", str(path), "--out", str(out)]
    command += ["--checkpoint", str(weights[0]), "--device", "cpu", "--no-progress", "--threads", "1"]
    # Each run starts its own local Ray, never a cluster that happens to run on this machine.
    env = os.environ | {"RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled"}
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    runs = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        for log in logs
    ]
    results = [(run.wait(timeout=500), log.read_text()) for run, log in zip(runs, logs)]
    assert sorted(code for code, _ in results) == [0, 2], results
    (refused,) = [output.strip().splitlines()[-1] for code, output in results if code == 2]
    assert refused.startswith("error: ") and "another hqsam run" in refused, refused
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["annotations_written"] == 2
    assert not (out / "_hqsam_lease.json").exists()
