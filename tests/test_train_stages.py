"""The training chain's units without Ray, in seconds: the sample-loading stage, source parsing, the
recipe's step and optimizer, the run's settings and the checkpoint format (the Ray Train path end to
end is tests/test_train_job.py, marked slow)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from hqsam.hqsam_core import build_hqsam
from hqsam.hqsam_core.checkpoint import is_hq_key
from hqsam.hqsam_core.testing.random_weights import randomize_
from hqsam.hqsam_core.training import (
    HQTrainingModule,
    augment,
    freeze_sam_,
    load_base,
    make_optimizer,
    sample_seed,
    train_step,
)
from hqsam.pipeline.load_samples import LoadSamples
from hqsam.pipeline.stage import run_local
from hqsam.pipeline.train_checkpoints import (
    checkpoint_name,
    export_run,
    latest_checkpoint,
    read_checkpoint,
    restore_checkpoint,
    write_checkpoint,
)
from hqsam.pipeline.train_config import TrainConfig, TrainError, check_config, record_config
from hqsam.pipeline.train_run import sample_dataset, training_data
from hqsam.pipeline.train_sources import SourceError, parse_source, source_rows
from hqsam.schemas.refined import REFINED_ANNOTATION
from hqsam.schemas.train_rows import SAMPLE_SOURCE, TrainSample

# ---------------------------------------------------------------- the LoadSamples stage


@pytest.fixture
def pair(tmp_path: Path) -> Path:
    """A folder pair with one good sample "a" (20x30, a 10x10 square)."""
    root = tmp_path / "pair"
    (root / "im").mkdir(parents=True)
    (root / "gt").mkdir()
    image = np.full((20, 30, 3), 90, np.uint8)
    gt = np.zeros((20, 30), np.uint8)
    gt[5:15, 10:20] = 255
    Image.fromarray(image).save(root / "im" / "a.png")
    Image.fromarray(gt).save(root / "gt" / "a.png")
    return root


def load(rows: list[dict]) -> list[dict]:
    return list(run_local(rows, [LoadSamples()]))


def test_stage_turns_a_good_row_into_a_declared_training_sample(pair: Path) -> None:
    rows = source_rows(parse_source(str(pair))).to_pylist()
    assert set(rows[0]) == set(SAMPLE_SOURCE.names)
    (sample,) = load(rows)
    stage = LoadSamples()
    assert set(sample) == set(TrainSample.__annotations__)
    assert set(sample) == (set(rows[0]) - set(stage.drops)) | set(stage.adds)
    assert set(stage.reads) <= set(SAMPLE_SOURCE.names)
    assert (sample["source"], sample["key"]) == (str(pair), f"{pair}#a")
    assert sample["image"].shape == (20, 30, 3) and sample["image"].dtype == np.uint8
    assert (sample["image"] == 90).all()
    assert sample["mask"].dtype == np.uint8 and sample["mask"].sum() == 100
    assert sample["mask"][5:15, 10:20].all()


def test_stage_leaves_out_a_missing_image_with_a_warning(pair: Path, caplog) -> None:
    rows = source_rows(parse_source(str(pair))).to_pylist()
    (pair / "im" / "a.png").unlink()
    with caplog.at_level(logging.WARNING, logger="hqsam.pipeline.load_samples"):
        assert load(rows) == []
    assert "no image at" in caplog.text and f"{pair}#a" in caplog.text


def test_stage_leaves_out_an_empty_mask(pair: Path, caplog) -> None:
    rows = source_rows(parse_source(str(pair))).to_pylist()
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(pair / "gt" / "a.png")
    with caplog.at_level(logging.WARNING, logger="hqsam.pipeline.load_samples"):
        assert load(rows) == []
    assert "the mask is empty" in caplog.text


def test_stage_leaves_out_an_image_of_another_size_than_recorded(tmp_path: Path, caplog) -> None:
    Image.fromarray(np.full((20, 30, 3), 7, np.uint8)).save(tmp_path / "x.png")
    square = [[2.0, 2.0, 8.0, 2.0, 8.0, 8.0, 2.0, 8.0]]
    coco = {
        "images": [
            {"id": 1, "file_name": "x.png", "width": 30, "height": 20},
            {"id": 2, "file_name": "x.png", "width": 12, "height": 10},  # recorded wrong
        ],
        "annotations": [
            {"id": 10 + k, "image_id": k, "category_id": 1, "segmentation": square, "iscrowd": 0}
            | {"bbox": [2, 2, 6, 6]}
            for k in (1, 2)
        ],
        "categories": [{"id": 1, "name": "c"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    rows = source_rows(parse_source(str(tmp_path / "coco.json"))).to_pylist()
    with caplog.at_level(logging.WARNING, logger="hqsam.pipeline.load_samples"):
        samples = load(rows)
    assert [s["key"] for s in samples] == [f"{tmp_path / 'coco.json'}#11"]
    assert samples[0]["mask"].sum() == 36
    assert "#12" in caplog.text and "its record says 12x10" in caplog.text


def test_stage_keeps_the_good_rows_of_a_mixed_batch(pair: Path) -> None:
    good = source_rows(parse_source(str(pair))).to_pylist()[0]
    missing = good | {"key": "gone", "image_uri": str(pair / "im" / "gone.png")}
    no_mask = good | {"key": "nomask", "mask_uri": None}
    samples = load([missing, good, no_mask, good | {"key": "again"}])
    assert [s["key"] for s in samples] == [good["key"], "again"]


@pytest.mark.slow
def test_the_training_dataset_runs_the_same_stage_under_ray_data(ray_session, pair: Path) -> None:
    good = source_rows(parse_source(str(pair))).to_pylist()[0]
    rows = [good, good | {"key": "gone", "image_uri": str(pair / "im" / "gone.png")}, good | {"key": "b"}]
    local = load(rows)
    remote = sorted(
        sample_dataset(pa.Table.from_pylist(rows, schema=SAMPLE_SOURCE)).take_all(), key=lambda r: r["key"]
    )
    assert [r["key"] for r in remote] == sorted(r["key"] for r in local) == sorted([good["key"], "b"])
    for sample in remote:
        (mine,) = [r for r in local if r["key"] == sample["key"]]
        assert set(sample) == set(mine)
        assert np.array_equal(sample["image"], mine["image"]) and np.array_equal(sample["mask"], mine["mask"])


# ---------------------------------------------------------------- source parsing


def test_parse_source_reads_every_option_and_names_the_bad_one(pair: Path, tmp_path: Path) -> None:
    source = parse_source(f"{pair}::weight=1.5::original={tmp_path}")
    assert (source.kind, source.weight, source.original, source.images) == (
        "folders",
        1.5,
        str(tmp_path),
        None,
    )
    assert source.name == str(pair) and source.text == f"{pair}::weight=1.5::original={tmp_path}"
    assert parse_source(f"{pair}/").name == str(pair)
    with pytest.raises(SourceError, match=r"unknown option 'weight' \(use ::weight=W, ::images=ROOT"):
        parse_source(f"{pair}::weight")
    with pytest.raises(SourceError, match="unknown option 'images='"):
        parse_source(f"{pair}::images=")
    with pytest.raises(SourceError, match="has no path"):
        parse_source("::weight=2")
    with pytest.raises(SourceError, match="weight must be a positive number"):
        parse_source(f"{pair}::weight=inf")
    with pytest.raises(SourceError, match="neither a folder"):
        parse_source(str(pair / "im" / "a.png"))


def test_sources_keep_annotations_that_share_an_id_apart(tmp_path: Path) -> None:
    """Ids 7 three times (twice on one image) and 8 once: every sample gets its own key, and with
    ::original= its own original mask; a refine output's rows too."""
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "x.png")

    def square(k: int) -> list:
        return [[k, k, k + 5.0, k, k + 5.0, k + 5.0, k, k + 5.0]]

    ids = [(7, 1), (7, 2), (8, 1), (7, 1)]  # (annotation id, image id) in file order
    coco = {
        "images": [{"id": i, "file_name": "x.png", "width": 30, "height": 20} for i in (1, 2)],
        "annotations": [
            {"id": a, "image_id": i, "category_id": 1, "segmentation": square(k), "iscrowd": 0}
            for k, (a, i) in enumerate(ids)
        ],
    }
    original = json.loads(json.dumps(coco))
    for k, annotation in enumerate(original["annotations"]):
        annotation["segmentation"] = square(10 + k)
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    (tmp_path / "original.json").write_text(json.dumps(original))

    rows = source_rows(parse_source(f"{tmp_path / 'coco.json'}::original={tmp_path / 'original.json'}"))
    rows = rows.to_pylist()
    name = str(tmp_path / "coco.json")
    # grouped by image: image 1's annotations (positions 0, 2, 3), then image 2's (position 1)
    assert [r["key"] for r in rows] == [f"{name}#7@0", f"{name}#8", f"{name}#7@3", f"{name}#7@1"]
    for row, position in zip(rows, [0, 2, 3, 1]):
        assert json.loads(row["segmentation"]) == square(position)
        assert json.loads(row["original_segmentation"]) == square(10 + position), position

    refined = [
        {"image_id": i, "image_uri": str(tmp_path / "x.png"), "annotation_id": a, "ann_index": k}
        | {"segmentation": {"size": [20, 30], "counts": "0"}, "score": 0.9, "status": "ok"}
        | {"model": "vit_tiny"}
        for k, (a, i) in enumerate(ids)
    ]
    (tmp_path / "out" / "rows").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(refined, schema=REFINED_ANNOTATION), tmp_path / "out" / "rows" / "part-0.parquet"
    )
    keys = [r["key"] for r in source_rows(parse_source(str(tmp_path / "out"))).to_pylist()]
    out = str(tmp_path / "out")
    assert keys == [f"{out}#7@0", f"{out}#7@1", f"{out}#8", f"{out}#7@3"]


# ---------------------------------------------------------------- the recipe


@pytest.fixture(scope="module")
def tiny_model():
    return randomize_(build_hqsam("vit_tiny"), seed=5)


def test_train_step_changes_only_the_hq_parameters(tiny_model) -> None:
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    params = freeze_sam_(tiny_model)
    tiny_model.eval()
    optimizer, _ = make_optimizer(params, 1e-3, 10)
    image = np.full((64, 48, 3), 40, np.uint8)
    mask = np.zeros((64, 48), bool)
    mask[10:50, 12:36] = True
    image[mask] = 220
    sample = augment(image, mask, np.random.default_rng(sample_seed(0, 0, "k")))
    values = train_step(
        HQTrainingModule(tiny_model),
        tiny_model,
        optimizer,
        [sample],
        generator=torch.Generator().manual_seed(0),
    )
    assert values.shape == (3,) and torch.isfinite(values).all() and not values.requires_grad
    assert values[0] == pytest.approx(float(values[1] + values[2]), rel=1e-5)
    after = tiny_model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed and all(is_hq_key(k) for k in changed)
    assert {k for k, _ in tiny_model.named_parameters() if is_hq_key(k)} <= changed


def test_make_optimizer_drops_the_lr_tenfold_every_n_epochs() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer, scheduler = make_optimizer([param], 1e-3, 2)
    assert optimizer.param_groups[0]["weight_decay"] == 0 and optimizer.param_groups[0]["betas"] == (
        0.9,
        0.999,
    )
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5])


def test_augment_is_a_function_of_seed_epoch_and_key() -> None:
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[5:30, 10:40] = True

    def run(epoch: int, key: str):
        return augment(image, mask, np.random.default_rng(sample_seed(3, epoch, key)))

    first, again, other = run(0, "a"), run(0, "a"), run(1, "a")
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[0].shape == (1024, 1024, 3) and first[1].shape == (1024, 1024)
    assert first[2].kind in ("box", "points", "mask")
    assert not np.array_equal(first[1], other[1])


def test_load_base_gives_every_worker_the_same_fresh_head_quietly(
    tiny_checkpoint: Path, tmp_path: Path, caplog
) -> None:
    sam_only = tmp_path / "sam.pth"
    state = {k: v for k, v in torch.load(tiny_checkpoint, weights_only=True).items() if not is_hq_key(k)}
    torch.save(state, sam_only)
    with caplog.at_level(logging.WARNING):
        one = load_base("vit_tiny", str(sam_only), None, seed=7).state_dict()
        two = load_base("vit_tiny", str(sam_only), None, seed=7).state_dict()
    assert "has no HQ head" not in caplog.text
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert all(torch.equal(one[k], v) for k, v in state.items())


# ---------------------------------------------------------------- the run's settings


def test_config_checks_and_the_record_of_a_run(pair: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="--precision must be fp32 or bf16"):
        check_config(TrainConfig(data=[str(pair)], out=str(tmp_path), precision="fp16"))
    with pytest.raises(TrainError, match="at least one --data"):
        check_config(TrainConfig(data=[], out=str(tmp_path)))
    out = tmp_path / "run"
    record_config(TrainConfig(data=[str(pair)], out=str(out), checkpoint="a.pth"))
    recorded = json.loads((out / "train_config.json").read_text())
    assert recorded["checkpoint"] == "a.pth" and recorded["started"]
    record_config(TrainConfig(data=[str(pair)], out=str(out), checkpoint="a.pth", epochs=3))
    again = json.loads((out / "train_config.json").read_text())
    assert again["epochs"] == 3 and again["started"] == recorded["started"]
    with pytest.raises(TrainError, match=r"holds a run with another checkpoint \('a.pth'\)"):
        record_config(TrainConfig(data=[str(pair)], out=str(out), checkpoint="b.pth"))


def test_training_data_counts_steps_and_refuses_too_few_samples(pair: Path, tmp_path: Path) -> None:
    data = training_data(TrainConfig(data=[f"{pair}::weight=3"], out="x", val=[str(pair)], batch_size=2))
    assert data.rows.num_rows == 3 and data.steps_per_epoch == 1 and data.counts == {str(pair): 1}
    assert [row["key"] for row in data.val_rows] == [f"{pair}#a"]
    with pytest.raises(TrainError, match="3 training samples are fewer than one step needs"):
        training_data(TrainConfig(data=[f"{pair}::weight=3"], out="x", workers=2, batch_size=2))


# ---------------------------------------------------------------- checkpoints and export


def test_checkpoints_round_trip_and_export_takes_the_latest_complete(
    tiny_checkpoint: Path, pair: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    record_config(TrainConfig(data=[str(pair)], out=str(out), checkpoint=str(tiny_checkpoint)))
    sam = load_base("vit_tiny", str(tiny_checkpoint), None)
    optimizer, scheduler = make_optimizer(freeze_sam_(sam), 1e-3, 1)
    for step in (2, 5):
        with torch.no_grad():
            for param in sam.mask_decoder.hf_token.parameters():
                param.add_(1.0)
        progress = {"epoch": 1, "step_in_epoch": 0, "global_step": step, "history": [{"epoch": 1}]}
        progress |= {"epoch_totals": [0.0] * 5, "starts": [0]}
        write_checkpoint(str(out / checkpoint_name(step, 1)), sam, optimizer, scheduler, progress)
    (out / checkpoint_name(9)).mkdir()  # Ray Train was still uploading this one: no progress.json
    latest = latest_checkpoint(str(out))
    assert latest.endswith("checkpoint_00000005_epoch1")
    assert not list(out.rglob(".*.tmp"))

    fresh = load_base("vit_tiny", str(tiny_checkpoint), None)
    fresh_optimizer, fresh_scheduler = make_optimizer(freeze_sam_(fresh), 1e-3, 1)
    saved = restore_checkpoint(latest, fresh, fresh_optimizer, fresh_scheduler)
    assert saved["global_step"] == 5 and saved["starts"] == [0]
    assert torch.equal(fresh.mask_decoder.hf_token.weight, sam.mask_decoder.hf_token.weight)

    summary = export_run(str(out))
    assert summary["checkpoint"] == latest and summary["global_step"] == 5
    head = torch.load(out / "hq_head.pth", weights_only=True)
    assert set(head) == set(read_checkpoint(latest)["hq_state"])
    assert json.loads((out / "metrics.json").read_text())["epochs"] == [{"epoch": 1}]
    with pytest.raises(TrainError, match="not an `hqsam train` run"):
        export_run(str(tmp_path / "nothing"))
    with pytest.raises(TrainError, match="holds no complete checkpoint"):
        latest_checkpoint(str(tmp_path))
