"""`hqsam train` and its data sources.

Sources: parsed, listed and decoded without Ray (folder pairs, COCO, refine outputs, weights, S3).
Training (marked slow): real Ray Train with 2 CPU workers on the labelme fixture (COCO source) merged with a
generated thin-structure folder pair; a run killed with SIGKILL resumes from its last checkpoint;
the exports load strictly into the official package and keep SAM's weights bit for bit.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from hqsam.hqsam_core import build_hqsam
from hqsam.hqsam_core.checkpoint import is_hq_key
from hqsam.hqsam_core.masks import encode_rle
from hqsam.hqsam_core.metrics import mask_iou
from hqsam.hqsam_core.testing.thin_structures import generate_thin_structures
from hqsam.pipeline.load_samples import SampleError, gt_to_mask, load_sample
from hqsam.pipeline.train_config import TrainConfig, TrainError
from hqsam.pipeline.train_run import run_train
from hqsam.pipeline.train_sources import SourceError, apply_weight, merge_sources, parse_source, source_rows
from hqsam.pipeline.write_parquet import write_atomically
from hqsam.schemas.refined import REFINED_ANNOTATION
from tests.conftest import ROOT, kill_session, shared_fixture

segment_anything_hq = pytest.importorskip("segment_anything_hq")


def write_pair(root: Path, count: int, seed: int, size: int = 96) -> Path:
    """A generated HQSeg-style folder pair: root/im/<i>.png + root/gt/<i>.png (0/255)."""
    (root / "im").mkdir(parents=True)
    (root / "gt").mkdir()
    for i, (image, mask) in enumerate(generate_thin_structures(count, seed, size=size)):
        Image.fromarray(image).save(root / "im" / f"s{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "gt" / f"s{i}.png")
    return root


@pytest.fixture(scope="module")
def thin_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pair(tmp_path_factory.mktemp("thin") / "train", 6, seed=3)


@pytest.fixture(scope="module")
def val_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pair(tmp_path_factory.mktemp("thin") / "val", 2, seed=4)


# ---------------------------------------------------------------- sources (no Ray)


def test_parse_source_options_and_kinds(thin_pair: Path, tmp_path: Path) -> None:
    labelme = shared_fixture("labelme-voc")
    source = parse_source(f"{labelme}/annotations.json::weight=2.5::images={labelme}")
    assert (source.kind, source.weight, source.images) == ("coco", 2.5, str(labelme))
    assert parse_source(str(thin_pair)).kind == "folders"
    write_atomically(str(tmp_path / "refined" / "rows" / "part-0.parquet"), REFINED_ANNOTATION.empty_table())
    assert parse_source(str(tmp_path / "refined")).kind == "refined"  # OUT
    assert parse_source(str(tmp_path / "refined" / "rows")).kind == "refined"  # OUT/rows
    bad = [
        (f"{thin_pair}::weight=0", "positive"),
        (f"{thin_pair}::weight=x", "positive"),
        (f"{thin_pair}::colour=red", "unknown option"),
        (f"{thin_pair}::images=/x", "COCO files only"),
        (str(tmp_path / "missing.json"), "does not exist"),
        (str(tmp_path), r"neither im/ \+ gt/"),
    ]
    for text, message in bad:
        with pytest.raises(SourceError, match=message):
            parse_source(text)


def test_gt_to_mask_reads_binary_soft_and_label_pngs() -> None:
    values = np.array([[0, 100, 129, 255]], np.uint8)
    assert gt_to_mask(Image.fromarray(values)).tolist() == [[False, False, True, True]]  # official > 128
    assert gt_to_mask(Image.fromarray(np.array([[0, 1, 1]], np.uint8))).tolist() == [[False, True, True]]
    palette = Image.fromarray(np.array([[0, 1, 2, 255]], np.uint8), mode="L").convert("P")
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192])
    assert palette.mode == "P"
    assert gt_to_mask(palette).tolist() == [[False, True, True, False]]  # VOC's 255 band is void
    rgb = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8))
    assert gt_to_mask(rgb).tolist() == [[False, True]]


def test_folder_pair_matches_stems_and_original(tmp_path: Path) -> None:
    root = tmp_path / "pair"
    for folder in ("im", "gt", "orig"):
        (root / folder).mkdir(parents=True)
    image = np.full((20, 30, 3), 90, np.uint8)
    gt = np.zeros((20, 30), np.uint8)
    gt[5:15, 10:20] = 255
    for stem in ("a", "b", "only_image"):
        Image.fromarray(image).save(root / "im" / f"{stem}.{'jpg' if stem == 'a' else 'png'}")
    for stem in ("a", "b", "only_gt"):
        Image.fromarray(gt).save(root / "gt" / f"{stem}.png")
    coarse = np.zeros_like(gt)
    coarse[4:16, 9:21] = 255
    Image.fromarray(coarse).save(root / "orig" / "a.png")
    rows = source_rows(parse_source(f"{root}::original={root / 'orig'}")).to_pylist()
    assert [Path(r["image_uri"]).name for r in rows] == ["a.jpg", "b.png"]
    sample = load_sample(rows[0])
    assert sample["mask"].dtype == bool and sample["mask"].sum() == 100
    assert mask_iou(sample["original"], sample["mask"]) == pytest.approx(100 / 144)
    assert load_sample(rows[1])["original"] is None
    Image.fromarray(np.zeros_like(gt)).save(root / "gt" / "b.png")
    with pytest.raises(SampleError, match="empty"):
        load_sample(rows[1])
    (root / "im" / "a.jpg").unlink()
    with pytest.raises(SampleError, match="no image"):
        load_sample(rows[0])


def test_coco_source_one_sample_per_instance_matches_the_instance_pngs() -> None:
    """labelme's polygons, decoded by the COCO source, against the instance PNGs the tool wrote."""
    labelme = shared_fixture("labelme-voc")
    rows = source_rows(parse_source(str(labelme / "annotations.json"))).to_pylist()
    coco = json.loads((labelme / "annotations.json").read_text())
    assert len(rows) == len(coco["annotations"]) == 12
    for row in rows:
        sample = load_sample(row)
        image = next(i for i in coco["images"] if i["id"] == row["image_id"])
        ids = np.asarray(
            Image.open(labelme / "SegmentationObject" / (Path(image["file_name"]).stem + ".png"))
        )
        assert sample["image"].shape[:2] == ids.shape == (image["height"], image["width"])
        best = max(mask_iou(sample["mask"], ids == k) for k in np.unique(ids) if k not in (0, 255))
        assert best > 0.85, (row["key"], best)


def test_coco_source_skips_crowd_and_takes_an_images_root(tmp_path: Path) -> None:
    (tmp_path / "pics").mkdir()
    Image.fromarray(np.full((10, 12, 3), 7, np.uint8)).save(tmp_path / "pics" / "x.png")
    square = [[2.0, 2.0, 8.0, 2.0, 8.0, 8.0, 2.0, 8.0]]
    coco = {
        "images": [{"id": 5, "file_name": "x.png", "width": 12, "height": 10}],
        "annotations": [
            {
                "id": 1,
                "image_id": 5,
                "category_id": 3,
                "segmentation": square,
                "iscrowd": 0,
                "bbox": [2, 2, 6, 6],
            },
            {
                "id": 2,
                "image_id": 5,
                "category_id": 3,
                "segmentation": square,
                "iscrowd": 1,
                "bbox": [2, 2, 6, 6],
            },
            {"id": 3, "image_id": 5, "category_id": 3, "iscrowd": 0, "bbox": [2, 2, 6, 6]},
        ],
        "categories": [{"id": 3, "name": "c"}],
    }
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "coco.json").write_text(json.dumps(coco))
    rows = source_rows(
        parse_source(f"{tmp_path / 'ann' / 'coco.json'}::images={tmp_path / 'pics'}")
    ).to_pylist()
    assert [(r["annotation_id"], r["category_id"], r["image_id"]) for r in rows] == [(1, 3, 5)]
    assert load_sample(rows[0])["mask"].sum() == 36


def test_refined_source_keeps_ok_rows_above_min_score(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(tmp_path / "p.png")
    mask = np.zeros((8, 8), bool)
    mask[2:6, 1:7] = True
    rle = encode_rle(mask)
    rows = []
    for k, (status, score) in enumerate([("ok", 0.9), ("ok", 0.3), ("invalid_box", None), ("ok", None)]):
        ok = status == "ok"
        rows.append(
            {"image_id": 1, "image_uri": str(tmp_path / "p.png"), "annotation_id": k, "ann_index": k}
            | {"category_id": 2}
            | {"bbox": [1.0, 2.0, 6.0, 4.0] if ok else None, "area": 24 if ok else None}
            | {"segmentation": rle if ok else None, "score": score, "iou_vs_original": None}
            | {"boundary_iou_vs_original": None, "status": status, "error": None, "model": "vit_tiny"}
        )
    write_atomically(
        str(tmp_path / "out" / "rows" / "part-a.parquet"),
        pa.Table.from_pylist(rows, schema=REFINED_ANNOTATION),
    )
    source = parse_source(str(tmp_path / "out"))
    assert [r["annotation_id"] for r in source_rows(source).to_pylist()] == [0, 1, 3]
    kept = source_rows(source, min_score=0.5).to_pylist()
    assert [r["annotation_id"] for r in kept] == [0]
    sample = load_sample(kept[0])
    assert np.array_equal(sample["mask"], mask) and sample["category_id"] == 2


def test_weights_repeat_samples_with_distinct_keys(thin_pair: Path) -> None:
    rows = source_rows(parse_source(str(thin_pair)))
    weighted = apply_weight(rows, 2.5, np.random.default_rng(0))
    keys = weighted["key"].to_pylist()
    assert len(keys) == 15 and len(set(keys)) == 15
    assert apply_weight(rows, 0.5, np.random.default_rng(0)).num_rows == 3
    labelme = shared_fixture("labelme-voc")
    merged, counts = merge_sources(
        [parse_source(f"{thin_pair}::weight=2"), parse_source(str(labelme / "annotations.json"))]
    )
    assert merged.num_rows == 24 and list(counts.values()) == [6, 12]


def test_sources_on_s3(s3_bucket: str, thin_pair: Path) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(thin_pair), f"{s3_bucket}/data/pair", recursive=True)
    rows = source_rows(parse_source(f"s3://{s3_bucket}/data/pair")).to_pylist()
    assert len(rows) == 6 and all(r["image_uri"].startswith(f"s3://{s3_bucket}/") for r in rows)
    local = load_sample(source_rows(parse_source(str(thin_pair))).to_pylist()[0])
    remote = load_sample(rows[0])
    assert np.array_equal(remote["image"], local["image"]) and np.array_equal(remote["mask"], local["mask"])


# ---------------------------------------------------------------- Ray Train


@pytest.fixture(scope="module")
def smoke_run(ray_session, tiny_checkpoint: Path, thin_pair: Path, val_pair: Path, tmp_path_factory):
    """3 steps of 2 workers x 1 sample on labelme (COCO) + the thin pair (weight 2), validated."""
    labelme = shared_fixture("labelme-voc")
    out = tmp_path_factory.mktemp("train") / "run"
    config = TrainConfig(
        data=[str(labelme / "annotations.json"), f"{thin_pair}::weight=2"],
        out=str(out),
        checkpoint=str(tiny_checkpoint),
        val=[str(val_pair)],
        workers=2,
        batch_size=1,
        max_steps=3,
        checkpoint_every=2,
        keep_checkpoints=2,
        cpus_per_worker=0.5,
    )
    return out, run_train(config, progress=False)


@pytest.mark.slow
def test_smoke_run_reports_loss_validation_and_checkpoints(
    smoke_run, thin_pair: Path, val_pair: Path
) -> None:
    out, summary = smoke_run
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["global_step"] == 3 and summary["starts"] == [0]
    assert summary["samples_per_epoch"] == 12 + 2 * 6 and summary["steps_per_epoch"] == 12
    assert list(summary["samples_per_source"].values()) == [12, 6]
    (epoch,) = summary["epochs"]
    assert epoch["epoch"] == 1 and epoch["steps"] == 3 and epoch["partial"]
    assert np.isfinite(epoch["train_loss"]) and epoch["train_loss"] > 0
    assert epoch["train_loss"] == pytest.approx(epoch["train_bce"] + epoch["train_dice"])
    val = epoch["val"]
    assert val["samples"] == 2 and val["skipped"] == 0
    assert set(val["overall"]) == {"sam_miou", "sam_mbiou", "hq_miou", "hq_mbiou"}
    assert all(0.0 <= v <= 1.0 for v in val["overall"].values())
    assert list(val["sources"]) == [str(val_pair)]
    # checkpoints after steps 2 and 3; --keep-checkpoints 2 keeps both, nothing older exists
    assert sorted(p.name for p in out.glob("checkpoint_0*")) == ["checkpoint_00000002", "checkpoint_00000003"]


@pytest.mark.slow
def test_exports_load_strictly_in_the_official_package_and_ours(smoke_run, tiny_checkpoint: Path) -> None:
    out, _ = smoke_run
    head = torch.load(out / "hq_head.pth", weights_only=True)
    full = torch.load(out / "model.pth", weights_only=True)
    official = segment_anything_hq.sam_model_registry["vit_tiny"]()
    official_hq = {k for k in official.state_dict() if is_hq_key(k)}
    assert set(head) == official_hq and all(k.startswith("mask_decoder.") for k in head)
    official.load_state_dict(full, strict=True)
    official_head = segment_anything_hq.sam_model_registry["vit_tiny"]()
    missing = official_head.load_state_dict(head, strict=False)
    assert not missing.unexpected_keys and not (set(missing.missing_keys) & official_hq)
    ours = build_hqsam("vit_tiny", str(out / "model.pth")).state_dict()
    combined = build_hqsam("vit_tiny", str(tiny_checkpoint), str(out / "hq_head.pth")).state_dict()
    for key, value in full.items():
        assert torch.equal(ours[key], value) and torch.equal(combined[key], value), key


@pytest.mark.slow
def test_sam_weights_are_bit_identical_and_only_the_head_changed(smoke_run, tiny_checkpoint: Path) -> None:
    out, _ = smoke_run
    base = torch.load(tiny_checkpoint, weights_only=True)
    full = torch.load(out / "model.pth", weights_only=True)
    assert list(full) == list(base)
    for key, value in base.items():
        if is_hq_key(key):
            assert not torch.equal(full[key], value), f"{key} was not trained"
        else:
            assert full[key].dtype == value.dtype and full[key].shape == value.shape, key
            assert full[key].numpy().tobytes() == value.numpy().tobytes(), f"{key} changed"


@pytest.mark.slow
def test_export_command_rewrites_the_same_files(smoke_run, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hqsam.jobs.cli import app

    out, summary = smoke_run
    before = {name: torch.load(out / name, weights_only=True) for name in ("hq_head.pth", "model.pth")}
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for name in ("hq_head.pth", "model.pth", "metrics.json"):
        (copy / name).unlink()
    result = CliRunner().invoke(app, ["export", str(copy)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "checkpoint_00000003" in result.output
    for name, state in before.items():
        again = torch.load(copy / name, weights_only=True)
        assert list(again) == list(state) and all(torch.equal(again[k], v) for k, v in state.items())
    assert json.loads((copy / "metrics.json").read_text())["epochs"] == summary["epochs"]
    result = CliRunner().invoke(app, ["export", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not an `hqsam train` run" in result.stderr


@pytest.mark.slow
def test_a_run_folder_refuses_another_base(
    smoke_run, tiny_checkpoint: Path, thin_pair: Path, tmp_path
) -> None:
    out, _ = smoke_run
    other = tmp_path / "other.pth"
    shutil.copy(tiny_checkpoint, other)
    config = TrainConfig(data=[str(thin_pair)], out=str(out), checkpoint=str(other), batch_size=1)
    with pytest.raises(TrainError, match="holds a run with another checkpoint"):
        run_train(config, progress=False)
    with pytest.raises(TrainError, match="fewer than one step needs"):
        run_train(TrainConfig(data=[str(thin_pair)], out=str(tmp_path / "x"), workers=4, batch_size=2))


# ---------------------------------------------------------------- resume after SIGKILL


def registered_steps(fs, out: str) -> list[int]:
    """Steps of the checkpoints Ray Train has registered in OUT (its snapshot names them)."""
    fs.invalidate_cache()
    snapshot = f"{out}/checkpoint_manager_snapshot.json"
    if not fs.exists(snapshot):
        return []
    text = fs.cat(snapshot).decode()
    steps = []
    for progress in fs.glob(f"{out}/checkpoint_*/progress.json"):
        if progress.split("/")[-2] in text:
            steps.append(json.loads(fs.cat(progress))["global_step"])
    return sorted(steps)


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint_on_s3(
    s3_bucket: str, tiny_checkpoint: Path, thin_pair: Path, tmp_path
) -> None:
    """Data and OUT on S3; `hqsam train` SIGKILLed (with its Ray) after its first checkpoint; the
    same command again continues from the last checkpoint and ends at --max-steps."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(thin_pair), f"{s3_bucket}/pair", recursive=True)
    out = f"{s3_bucket}/runs/resume"
    command = [
        sys.executable,
        "-m",
        "hqsam.jobs.cli",
        "train",
        "--data",
        f"s3://{s3_bucket}/pair",
        "--out",
        f"s3://{out}",
    ]
    command += [
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--workers",
        "2",
        "--batch-size",
        "1",
    ]
    command += ["--cpus-per-worker", "0.5", "--max-steps", "4", "--checkpoint-every", "1", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # AWS_* point at the local S3
    env["RAY_AUTH_MODE"] = "disabled"
    log = tmp_path / "killed.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 600
        while not registered_steps(fs, out):
            assert process.poll() is None, (
                f"the run ended before its first checkpoint:\n{log.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, "no checkpoint after 600 s"
            time.sleep(0.5)
        assert process.poll() is None, "the run finished before the kill"
    finally:
        kill_session(process)
    first = registered_steps(fs, out)[-1]
    assert 1 <= first < 4
    assert not fs.exists(f"{out}/metrics.json") and not fs.exists(f"{out}/model.pth")

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "trained 4 steps" in rerun.stdout
    metrics = json.loads(fs.cat(f"{out}/metrics.json"))
    # The second run began at the last registered checkpoint and trained only the remaining
    # steps: the step count continues, it does not restart.
    assert metrics["global_step"] == 4 and metrics["starts"] == [0, first]
    assert sum(epoch["steps"] for epoch in metrics["epochs"]) == 4  # 3 steps per epoch: 3 + 1
    assert [epoch["epoch"] for epoch in metrics["epochs"]] == [1, 2]
    assert registered_steps(fs, out)[-1] == 4
    head = torch.load(io.BytesIO(fs.cat(f"{out}/hq_head.pth")), weights_only=True)
    assert head and all(is_hq_key(key) for key in head)
