"""A real refine output read as users read it: OUT/rows by pandas, pyarrow, DuckDB, polars and Ray Data,
locally and on S3 (moto), each finding every annotation exactly once; the columns that make a row
usable without the input (file_name, width, height, iscrowd, prompt_box), checked against the input;
and annotations.json, loaded with pycocotools, with its `hqsam` object and deeply nested input kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hqsam.hqsam_core import storage
from hqsam.pipeline.read_refined import ROWS_FOLDER, rows_folder
from hqsam.pipeline.refine_pipeline import RefineSettings
from hqsam.pipeline.refine_run import RefineConfig, run_refine
from hqsam.pipeline.write_coco import write_coco

W, H = 64, 48
DEPTH = 300  # orjson writes at most 254 levels


def deep(levels: int, leaf=1) -> list:
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


def coco_file(root: Path) -> dict:
    """Three images and annotations for every case the new columns have."""
    rng = np.random.default_rng(3)
    for name in ("a.png", "b.png", "c.png"):
        base = rng.integers(0, 256, size=(H // 8, W // 8, 3), dtype=np.uint8)
        Image.fromarray(np.kron(base, np.ones((8, 8, 1), np.uint8))).save(root / name)
    polygon = [[4.0, 4.0, 34.0, 4.0, 30.0, 26.0, 6.0, 22.0]]
    annotation = {"category_id": 1, "iscrowd": 0}
    return {
        "images": [
            {"id": i, "file_name": name, "width": W, "height": H}
            for i, name in ((1, "a.png"), (2, "b.png"), (3, "c.png"))
        ],
        "annotations": [
            annotation | {"id": 10, "image_id": 1, "bbox": [4, 4, 30, 22], "segmentation": polygon},
            # partly outside: clipped; user keys nested deeper than orjson writes are kept as they are
            annotation | {"id": 11, "image_id": 1, "bbox": [40, 30, 50, 40], "attributes": deep(DEPTH)},
            annotation | {"id": 12, "image_id": 2, "bbox": [2, 3, 20, 15], "iscrowd": 1},
            annotation
            | {"id": 13, "image_id": 2, "bbox": [10, 10, 20, 20], "segmentation": deep(DEPTH, 2.0)},
            annotation | {"id": 14, "image_id": 3, "bbox": [-5.5, -5, 20, 20]},
            # no image record: image_missing, its deep segmentation kept as it is
            annotation | {"id": 15, "image_id": 9, "bbox": [1, 1, 5, 5], "segmentation": deep(DEPTH, 3.0)},
            annotation | {"id": 16, "image_id": 2, "bbox": [5, 5, 0, 0]},  # zero size: invalid_box
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }


STATUSES = ["ok", "ok", "crowd_skipped", "ok", "ok", "image_missing", "invalid_box"]


def expected_prompt(annotation: dict, image: dict | None) -> list[float] | None:
    """The input's bbox as XYXY clipped to its image, for the annotations that were prompted."""
    x, y, w, h = annotation["bbox"]
    if image is None or annotation["iscrowd"] or w <= 0 or h <= 0:
        return None
    return [max(0.0, x), max(0.0, y), min(float(image["width"]), x + w), min(float(image["height"]), y + h)]


@pytest.fixture(scope="module")
def refined(ray_session, tiny_checkpoint, tmp_path_factory) -> tuple[Path, dict, Path]:
    """(OUT, the input COCO dict, its path) of one real `--format coco` run."""
    root = tmp_path_factory.mktemp("readers")
    coco = coco_file(root)
    path = root / "coco.json"
    path.write_text(json.dumps(coco))
    out = root / "out"
    settings = RefineSettings("vit_tiny", str(tiny_checkpoint), None, "cpu", batch_size=2, torch_threads=1)
    config = RefineConfig(str(path), str(out), format="coco", settings=settings, max_error_rate=1.0)
    summary = run_refine(config, progress=False)
    assert summary["complete"] and summary["annotations_written"] == len(coco["annotations"])
    return out, coco, path


def check_rows(ann_index: list, status: list, coco: dict) -> None:
    """Every annotation exactly once, with its status."""
    assert sorted(ann_index) == list(range(len(coco["annotations"])))
    assert [s for _, s in sorted(zip(ann_index, status))] == STATUSES


@pytest.mark.slow
def test_every_reader_reads_out_rows_whole(refined) -> None:
    import duckdb
    import pandas as pd
    import polars as pl
    import ray

    out, coco, _ = refined
    rows = str(out / ROWS_FOLDER)
    assert rows_folder(str(out)) == rows
    names = sorted(p.name for p in Path(rows).iterdir())
    assert names and all(name.startswith("part-") and name.endswith(".parquet") for name in names)
    assert sorted(p.name for p in out.iterdir()) == [
        "_hqsam_run.json",
        "annotations.json",
        "rows",
        "summary.json",
    ]

    frame = pd.read_parquet(rows)
    check_rows(frame["ann_index"].tolist(), frame["status"].tolist(), coco)
    for table in (
        pq.read_table(rows),
        ds.dataset(rows, format="parquet").to_table(),
        ds.dataset(rows).to_table(),
    ):
        check_rows(table["ann_index"].to_pylist(), table["status"].to_pylist(), coco)
    pairs = duckdb.sql(f"SELECT ann_index, status FROM read_parquet('{rows}')").fetchall()
    check_rows([a for a, _ in pairs], [s for _, s in pairs], coco)
    polars = pl.read_parquet(rows)
    check_rows(polars["ann_index"].to_list(), polars["status"].to_list(), coco)
    records = ray.data.read_parquet(rows).take_all()
    check_rows([r["ann_index"] for r in records], [r["status"] for r in records], coco)


@pytest.mark.slow
def test_rows_carry_the_inputs_file_name_size_crowd_flag_and_prompt(refined) -> None:
    out, coco, _ = refined
    images = {image["id"]: image for image in coco["images"]}
    rows = sorted(pq.read_table(out / ROWS_FOLDER).to_pylist(), key=lambda row: row["ann_index"])
    for row, annotation in zip(rows, coco["annotations"]):
        image = images.get(annotation["image_id"])
        assert row["file_name"] == (image and image["file_name"])  # as written, not the resolved path
        assert row["image_uri"] is None or row["image_uri"] != row["file_name"]
        assert (row["width"], row["height"]) == ((W, H) if image else (None, None))
        assert row["iscrowd"] == annotation["iscrowd"]
        prompt = expected_prompt(annotation, image)
        assert row["prompt_box"] == (None if prompt is None else pytest.approx(prompt)), row["ann_index"]
    assert rows[1]["prompt_box"] == [40.0, 30.0, W, H] and rows[4]["prompt_box"] == [0.0, 0.0, 14.5, 15.0]


@pytest.mark.slow
def test_annotations_json_has_the_new_hqsam_keys_and_keeps_deep_input(refined) -> None:
    from pycocotools.coco import COCO

    out, coco, _ = refined
    rows = {row["ann_index"]: row for row in pq.read_table(out / ROWS_FOLDER).to_pylist()}
    loaded = COCO(str(out / "annotations.json"))
    written = json.loads((out / "annotations.json").read_text())["annotations"]
    assert [a["id"] for a in written] == [a["id"] for a in coco["annotations"]]
    for position, annotation in enumerate(written):
        hqsam = loaded.anns[annotation["id"]]["hqsam"]
        row = rows[position]
        assert set(hqsam) >= {
            "score",
            "status",
            "error",
            "iou_vs_original",
            "boundary_iou_vs_original",
            "model",
        }
        assert hqsam["model"] == row["model"] and hqsam["status"] == row["status"]
        if row["boundary_iou_vs_original"] is None:
            assert hqsam["boundary_iou_vs_original"] is None
        else:
            assert hqsam["boundary_iou_vs_original"] == pytest.approx(row["boundary_iou_vs_original"])
    assert rows[0]["boundary_iou_vs_original"] is not None  # the polygon's: compared
    assert written[1]["attributes"] == deep(DEPTH)  # kept as it came
    assert written[5]["segmentation"] == deep(DEPTH, 3.0) and written[5]["hqsam"]["status"] == "image_missing"
    assert written[3]["hqsam"]["status"] == "ok" and "counts" in written[3]["segmentation"]


def test_write_coco_never_fails_on_deep_input_and_nulls_only_what_cannot_be_written(tmp_path) -> None:
    """Nesting orjson refuses is written by the standard library; deeper than Python recurses, the
    field alone becomes null and the annotation's `hqsam` object names it."""
    too_deep = deep(5000)
    coco = {
        "info": {"deep": deep(DEPTH)},
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H}],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [1, 1, 4, 4], "extra": deep(DEPTH)},
            {"id": 2, "image_id": 1, "bbox": [1, 1, 4, 4], "extra": too_deep, "note": "kept"},
        ],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({**coco, "annotations": [a | {"extra": []} for a in coco["annotations"]]}))
    # The file on disk cannot hold `too_deep` for a parser either, so the test writes its dict directly.
    from hqsam.pipeline import write_coco as module

    with storage.atomic_writer(str(tmp_path / "out.json")) as handle:
        module._write(handle, coco, iter(()), None)  # no rows
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["info"] == {"deep": deep(DEPTH)}
    first, second = written["annotations"]
    assert first["extra"] == deep(DEPTH) and "hqsam" not in first
    assert second["extra"] is None and second["note"] == "kept"
    assert second["hqsam"] == {"unwritable_fields": ["extra"]}
    write_coco(str(path), str(tmp_path / "out"))  # and the whole function on a file, without rows
    assert json.loads((tmp_path / "out" / "annotations.json").read_text())["annotations"][1]["extra"] == []


@pytest.mark.slow
def test_readers_read_out_rows_on_s3(refined, s3_bucket) -> None:
    import pandas as pd
    import s3fs

    out, coco, _ = refined
    remote = f"s3://{s3_bucket}/run/out"
    for local in [*out.glob("*.json"), *(out / ROWS_FOLDER).iterdir()]:
        storage.write_bytes(storage.join(remote, str(local.relative_to(out))), local.read_bytes())
    rows = rows_folder(remote)
    fs = s3fs.S3FileSystem()
    path = rows.removeprefix("s3://")
    for table in (
        pq.read_table(path, filesystem=fs),
        ds.dataset(path, filesystem=fs, format="parquet").to_table(),
    ):
        check_rows(table["ann_index"].to_pylist(), table["status"].to_pylist(), coco)
    frame = pd.read_parquet(rows)
    check_rows(frame["ann_index"].tolist(), frame["status"].tolist(), coco)
    check_duckdb_on_s3(rows, fs, coco)


def check_duckdb_on_s3(rows: str, fs, coco: dict) -> None:
    """DuckDB through the fsspec filesystem: its own S3 support is the httpfs extension, which it would
    download (no internet here). Through fsspec DuckDB does not list a folder itself, so it is given
    the folder's parts by pattern; with httpfs, read_parquet('s3://.../rows') reads the folder."""
    import duckdb

    connection = duckdb.connect()
    try:
        connection.register_filesystem(fs)
    except duckdb.Error as error:  # pragma: no cover - depends on the DuckDB build
        pytest.skip(f"DuckDB takes no fsspec filesystem here: {error}")
    pairs = connection.sql(f"SELECT ann_index, status FROM read_parquet('{rows}/*.parquet')").fetchall()
    check_rows([a for a, _ in pairs], [s for _, s in pairs], coco)
