"""Dirty annotation files at the source (pipeline/manifest.py), without Ray, in seconds.

A file whose structure cannot be trusted is refused in one sentence (ManifestError, exit 2 at the
CLI, never a traceback); a flaw that spoils only some annotations leaves them a row each, with a
status downstream. Ids are whole numbers: 1, 1.0 and true are never one image. Rows that repeat an
image id in a Parquet manifest are one image, as in a COCO file; an image with many annotations is
split into rows whose masks stay bounded; every row carries its annotations' input positions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hqsam.jobs.cli import app
from hqsam.pipeline.manifest import (
    ANNOTATIONS_PER_ROW_OF_UNKNOWN_SIZE,
    MAX_ANNOTATIONS_PER_ROW,
    ROW_MASK_PIXELS,
    ManifestError,
    annotation_count,
    annotations_per_row,
    duplicate_annotation_ids,
    first_images,
    image_count,
    read_manifest,
)
from hqsam.pipeline.read_images import ReadImages
from hqsam.schemas.manifest import MANIFEST_ANNOTATION, PARQUET_MANIFEST
from hqsam.schemas.refine_rows import IMAGE_TASK
from hqsam.schemas.status import Status

BOX = [4.0, 4.0, 20.0, 12.0]


def annotation(ann_id, image_id, **fields) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": BOX, "iscrowd": 0} | fields


def image(image_id, name: str = "a.png", **fields) -> dict:
    return {"id": image_id, "file_name": name, "width": 64, "height": 48} | fields


def coco_file(path: Path, images, annotations, text: str | None = None) -> Path:
    path.write_text(text if text is not None else json.dumps({"images": images, "annotations": annotations}))
    return path


def manifest_file(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


def good_manifest_rows() -> list[dict]:
    return [
        {"image_id": 7, "image_uri": "a.png", "width": 64, "height": 48}
        | {"annotations": [{"id": 1, "category_id": 1, "bbox": BOX, "segmentation": None, "iscrowd": 0}]},
    ]


# ---------------------------------------------------------------- refused files

COCO_REFUSALS = {
    # name: (images, annotations, words the one-sentence message must hold)
    "image_id null": ([image(1)], [annotation(1, None)], ["annotation #0", "no 'image_id'"]),
    "image_id missing": ([image(1)], [{"id": 1, "bbox": BOX}], ["annotation #0", "no 'image_id'"]),
    "image_id text": ([image(1)], [annotation(1, "1")], ["image_id '1'", "whole numbers"]),
    "image_id true": ([image(1)], [annotation(1, True)], ["image_id True"]),
    "image_id 1.0": ([image(1)], [annotation(1, 1.0)], ["image_id 1.0"]),
    "image_id 1.5": ([image(1)], [annotation(1, 1.5)], ["image_id 1.5"]),
    "image_id 2**63": ([image(1)], [annotation(1, 2**63)], [f"image_id {2**63}", "64 bits"]),
    # orjson reads integers beyond 64 bits as floats: refused as floats are
    "image_id -2**63-1": ([], [annotation(1, -(2**63) - 1)], ["annotation #0", "image_id -9.2", "64 bits"]),
    "image_id 1e30": ([image(1)], [annotation(1, 1e30)], ["image_id 1e+30"]),
    "1, 1.0 and true": (
        [image(1)],
        [annotation(1, 1), annotation(2, 1.0), annotation(3, True)],
        ["annotation #1", "image_id 1.0"],
    ),
    "annotation id text": ([image(1)], [annotation("5", 1)], ["annotation #0", "id '5'"]),
    "annotation id 5.0": ([image(1)], [annotation(1, 1), annotation(5.0, 1)], ["annotation #1", "id 5.0"]),
    "annotation id 2**64": ([image(1)], [annotation(2**64, 1)], ["annotation #0", "has id 1.8", "64 bits"]),
    "annotation id missing": ([image(1)], [{"image_id": 1}], ["annotation #0", "no 'id'"]),
    "annotation a list": (
        [image(1)],
        [annotation(1, 1), [1, 1]],
        ["annotation #1", "a list", "not an object"],
    ),
    "annotation text": ([image(1)], ["id"], ["annotation #0", "is text"]),
    "annotation null": ([image(1)], [None], ["annotation #0", "null"]),
    "annotation a number": ([image(1)], [7], ["annotation #0", "a number"]),
    "images a dict": ({"1": image(1)}, [annotation(1, 1)], ["'images'", "an object", "not a list"]),
    "images text": ("a.png", [annotation(1, 1)], ["'images'", "is text"]),
    "image a list": ([image(1), [2, "b.png"]], [annotation(1, 1)], ["image #1", "a list"]),
    "image null": ([None], [annotation(1, 1)], ["image #0", "null"]),
    "image id text": ([image("1")], [annotation(1, 1)], ["image #0", "id '1'"]),
    "image id 1.0": ([image(1.0)], [annotation(1, 1)], ["image #0", "id 1.0"]),
    "image id true": ([image(True)], [annotation(1, 1)], ["image #0", "id True"]),
    "image id null": ([image(None)], [annotation(1, 1)], ["image #0", "id None"]),
    "image id missing": ([{"file_name": "a.png"}], [annotation(1, 1)], ["image #0", "id None"]),
    "image id twice, two files": (
        [image(1, "a.png"), image(1, "b.png")],
        [annotation(1, 1)],
        ["image id 1", "two records", "a.png", "b.png"],
    ),
}


def assert_one_sentence(error: ManifestError, path: Path, words: list[str]) -> None:
    message = str(error)
    assert "\n" not in message and path.name in message, message
    for word in words:
        assert word in message, (word, message)
    assert error.exit_code == 2


@pytest.mark.parametrize("case", sorted(COCO_REFUSALS))
def test_coco_files_that_cannot_be_trusted_are_refused_in_one_sentence(case: str, tmp_path: Path) -> None:
    images, annotations, words = COCO_REFUSALS[case]
    path = coco_file(tmp_path / "coco.json", images, annotations)
    with pytest.raises(ManifestError) as refused:
        read_manifest(str(path))
    assert_one_sentence(refused.value, path, words)


def test_json_ids_beyond_64_bits_are_refused_however_the_parser_reads_them(tmp_path: Path) -> None:
    # orjson reads 2**64 as a float, Python's json (the NaN fallback) as an int: refused either way.
    for text in [
        '{"images": [], "annotations": [{"id": 1, "image_id": 18446744073709551616}]}',
        '{"images": [], "annotations": [{"id": 1, "image_id": 18446744073709551616, "bbox": [NaN, 1, 2, 3]}]}',
    ]:
        path = coco_file(tmp_path / "coco.json", None, None, text)
        with pytest.raises(ManifestError) as refused:
            read_manifest(str(path))
        assert_one_sentence(refused.value, path, ["annotation #0", "image_id 1"])


def test_a_file_that_starts_like_parquet_but_is_not_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "manifest.parquet"
    path.write_bytes(b"PAR1 and then no Parquet at all")
    with pytest.raises(ManifestError) as refused:
        read_manifest(str(path))
    assert_one_sentence(refused.value, path, ["starts like Parquet", "no readable Parquet file"])
    half = tmp_path / "half.parquet"
    manifest_file(half, pa.Table.from_pylist(good_manifest_rows(), schema=PARQUET_MANIFEST))
    half.write_bytes(half.read_bytes()[:60])
    with pytest.raises(ManifestError) as refused:
        read_manifest(str(half))
    assert_one_sentence(refused.value, half, ["starts like Parquet"])


def parquet_refusals() -> dict[str, tuple[pa.Table, list[str]]]:
    good = good_manifest_rows()
    struct_segmentation = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
    annotation_with_struct = pa.struct([("id", pa.int64()), ("segmentation", struct_segmentation)])
    return {
        "struct segmentation": (
            pa.table(
                {
                    "image_id": [1],
                    "image_uri": ["a.png"],
                    "annotations": pa.array(
                        [[{"id": 1, "segmentation": {"size": [4, 4], "counts": "16"}}]],
                        pa.list_(annotation_with_struct),
                    ),
                }
            ),
            ["annotations.segmentation", "JSON text"],
        ),
        "image_id floats": (
            pa.table({"image_id": [1.0], "image_uri": ["a.png"], "annotations": [good[0]["annotations"]]}),
            ["image_id", "double", "whole numbers"],
        ),
        "image_id text": (
            pa.table({"image_id": ["1"], "image_uri": ["a.png"], "annotations": [good[0]["annotations"]]}),
            ["image_id", "string"],
        ),
        "image_id null": (
            pa.table(
                {
                    "image_id": pa.array([1, None], pa.int64()),
                    "image_uri": ["a.png", "b.png"],
                    "annotations": [good[0]["annotations"]] * 2,
                }
            ),
            ["row #1", "no image_id"],
        ),
        "image_id beyond 64 bits": (
            pa.table(
                {
                    "image_id": pa.array([2**64 - 1], pa.uint64()),
                    "image_uri": ["a.png"],
                    "annotations": [good[0]["annotations"]],
                }
            ),
            ["image_id", "64 bits"],
        ),
        "annotation id null": (
            pa.table(
                {
                    "image_id": [1],
                    "image_uri": ["a.png"],
                    "annotations": pa.array(
                        [[{"id": 1}, {"id": None}]], pa.list_(pa.struct([("id", pa.int64())]))
                    ),
                }
            ),
            ["annotation #1", "no 'id'"],
        ),
        "annotation null": (
            pa.table(
                {
                    "image_id": [1],
                    "image_uri": ["a.png"],
                    "annotations": pa.array([[None, {"id": 2}]], pa.list_(pa.struct([("id", pa.int64())]))),
                }
            ),
            ["annotation #0", "no 'id'"],
        ),
        "annotations text": (
            pa.table({"image_id": [1], "image_uri": ["a.png"], "annotations": ["[]"]}),
            ["annotations", "list of annotation structs"],
        ),
        "image_uri numbers": (
            pa.table({"image_id": [1], "image_uri": [5], "annotations": [good[0]["annotations"]]}),
            ["image_uri", "int64", "text"],
        ),
        "same image_id, two files": (
            pa.table(
                {
                    "image_id": [1, 1],
                    "image_uri": ["a.png", "b.png"],
                    "annotations": [good[0]["annotations"]] * 2,
                }
            ),
            ["image id 1", "two records", "a.png", "b.png"],
        ),
    }


@pytest.mark.parametrize("case", sorted(parquet_refusals()))
def test_parquet_manifests_that_cannot_be_trusted_are_refused_in_one_sentence(case, tmp_path: Path) -> None:
    table, words = parquet_refusals()[case]
    path = manifest_file(tmp_path / "manifest.parquet", table)
    with pytest.raises(ManifestError) as refused:
        read_manifest(str(path))
    assert_one_sentence(refused.value, path, words)


CLI_CASES = ["image_id 1.0", "image_id null", "annotation a list", "images a dict", "image id text"]


def test_the_cli_refuses_unusable_files_with_exit_2_and_one_line(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    files = [coco_file(tmp_path / f"{n}.json", *COCO_REFUSALS[case][:2]) for n, case in enumerate(CLI_CASES)]
    files.append(tmp_path / "par1.parquet")
    files[-1].write_bytes(b"PAR1 and then no Parquet at all")
    table, _ = parquet_refusals()["struct segmentation"]
    files.append(manifest_file(tmp_path / "struct.parquet", table))
    for n, path in enumerate(files):
        result = CliRunner().invoke(
            app,
            ["refine", str(path), "--out", str(tmp_path / f"out{n}"), "--checkpoint", str(tiny_checkpoint)]
            + ["--device", "cpu", "--no-progress"],
        )
        assert result.exit_code == 2, (path.name, result.output, result.exception)
        message = result.stderr.strip()
        assert "\n" not in message and message.startswith("error: ") and path.name in message, message
        assert "Traceback" not in result.output and not isinstance(result.exception, ManifestError)


# ---------------------------------------------------------------- rows kept, with a status downstream


def test_an_image_record_without_a_usable_file_name_makes_its_annotations_image_missing(tmp_path) -> None:
    images = [
        image(1, "a.png"),
        {"id": 2, "width": 64, "height": 48},  # no file_name
        image(3, None),
        image(4, ""),
        image(5, 17),
        image(6, "f.png", width="64", height=True),  # unusable sizes: unknown, the decoder decides
        image(8, "h.png", width=64.0, height=48.0),
    ]
    annotations = [annotation(10 + i, i) for i in (1, 2, 3, 4, 5, 6, 8)]
    annotations.append(annotation(20, 1, category_id="cat", iscrowd="yes"))
    tasks = read_manifest(str(coco_file(tmp_path / "coco.json", images, annotations))).tasks
    rows = {row["image_id"]: row for row in tasks.to_pylist()}
    assert list(rows) == [1, 2, 3, 4, 5, 6, 8]
    assert rows[1]["image_uri"] == str(tmp_path / "a.png") and rows[1]["ann_indices"] == [0, 7]
    assert rows[1]["category_ids"] == [1, None] and rows[1]["iscrowd"] == [0, 0]
    for image_id in (2, 3, 4, 5):
        assert rows[image_id]["image_uri"] is None, image_id
    assert (rows[6]["width"], rows[6]["height"]) == (None, None)
    assert (rows[8]["width"], rows[8]["height"]) == (64, 48)

    read = ReadImages().process([rows[2], rows[5]])
    for row in read:
        assert row["image_status"] == Status.IMAGE_MISSING
        assert f"image_id {row['image_id']}" in row["image_error"] and "file name" in row["image_error"]


def test_a_parquet_manifest_with_a_null_image_uri_keeps_its_rows_as_image_missing(tmp_path) -> None:
    rows = good_manifest_rows() + [
        {"image_id": 8, "image_uri": None, "width": 64, "height": 48}
        | {"annotations": [{"id": 2, "category_id": 1, "bbox": BOX, "segmentation": None, "iscrowd": 0}]},
        {"image_id": 9, "image_uri": "", "width": None, "height": None}
        | {
            "annotations": [{"id": 3, "category_id": None, "bbox": None, "segmentation": "", "iscrowd": None}]
        },
    ]
    path = manifest_file(tmp_path / "m.parquet", pa.Table.from_pylist(rows, schema=PARQUET_MANIFEST))
    tasks = read_manifest(str(path)).tasks.to_pylist()
    assert [task["image_id"] for task in tasks] == [7, 8, 9]
    assert tasks[0]["image_uri"] == str(tmp_path / "a.png")
    assert tasks[1]["image_uri"] is None and tasks[2]["image_uri"] is None
    assert [task["ann_indices"] for task in tasks] == [[0], [1], [2]]
    assert tasks[2]["bboxes"] == [[]] and tasks[2]["iscrowd"] == [0] and tasks[2]["segmentations"] == [""]
    statuses = [row["image_status"] for row in ReadImages().process(tasks[1:])]
    assert statuses == [Status.IMAGE_MISSING] * 2


# ---------------------------------------------------------------- identity: positions, grouping


def test_positions_follow_the_input_and_duplicate_ids_stay_apart(tmp_path: Path) -> None:
    images = [image(1, "a.png"), image(2, "b.png")]
    annotations = [annotation(7, 2), annotation(7, 1), annotation(7, 2), annotation(8, 99), annotation(7, 1)]
    tasks = read_manifest(str(coco_file(tmp_path / "coco.json", images, annotations))).tasks.to_pylist()
    assert [(t["image_id"], t["ann_ids"], t["ann_indices"]) for t in tasks] == [
        (1, [7, 7], [1, 4]),
        (2, [7, 7], [0, 2]),
        (99, [8], [3]),  # no image record: image_missing downstream
    ]


def test_duplicate_ids_are_reported_with_the_smallest_as_examples(tmp_path: Path) -> None:
    ids = [9, 9, 3, 3, 40, 5, 5, 1, 1, 1, 7, 7, 2, 2, 6]  # repeated: 9, 3, 5, 1, 7, 2 (1 three times)
    annotations = [annotation(ann_id, 1 + position % 2) for position, ann_id in enumerate(ids)]
    tasks = read_manifest(str(coco_file(tmp_path / "coco.json", [image(1), image(2)], annotations))).tasks
    assert duplicate_annotation_ids(tasks) == {"ids": 6, "annotations": 13, "examples": [1, 2, 3, 5, 7]}
    assert duplicate_annotation_ids(tasks, examples=2)["examples"] == [1, 2]


def test_a_category_id_that_is_no_whole_number_is_null_in_any_company(tmp_path: Path) -> None:
    for others in ([1, None], [1, "c"]):  # Arrow alone cut 2.5 to 2 unless text came along
        annotations = [annotation(i, 1, category_id=c) for i, c in enumerate([2.5, *others, True, 4])]
        tasks = read_manifest(str(coco_file(tmp_path / "coco.json", [image(1)], annotations))).tasks
        assert tasks["category_ids"].to_pylist() == [[None, 1, None, None, 4]]


def test_parquet_rows_that_repeat_an_image_id_are_one_image(tmp_path: Path) -> None:
    def annotations(*ids):
        return [{"id": i, "category_id": 1, "bbox": BOX, "segmentation": None, "iscrowd": 0} for i in ids]

    rows = [
        {"image_id": 7, "image_uri": "a.png", "width": 64, "height": 48, "annotations": annotations(1, 2)},
        {"image_id": 8, "image_uri": "b.png", "width": 64, "height": 48, "annotations": annotations(3)},
        {"image_id": 7, "image_uri": "a.png", "width": 64, "height": 48, "annotations": annotations(4)},
        {"image_id": 9, "image_uri": "c.png", "width": 64, "height": 48, "annotations": None},
        {"image_id": 8, "image_uri": "b.png", "width": 64, "height": 48, "annotations": annotations(2)},
    ]
    path = manifest_file(tmp_path / "m.parquet", pa.Table.from_pylist(rows, schema=PARQUET_MANIFEST))
    tasks = read_manifest(str(path)).tasks
    assert tasks.schema.equals(IMAGE_TASK)
    assert [(t["image_id"], t["ann_ids"], t["ann_indices"]) for t in tasks.to_pylist()] == [
        (7, [1, 2, 4], [0, 1, 3]),
        (8, [3, 2], [2, 4]),
    ]
    assert image_count(tasks) == 2 and annotation_count(tasks) == 5


def test_a_parquet_manifest_of_narrower_types_reads_like_the_declared_one(tmp_path: Path) -> None:
    narrow = pa.struct(
        [
            ("id", pa.int32()),
            ("bbox", pa.list_(pa.int16())),
            ("iscrowd", pa.bool_()),
            ("category_id", pa.int8()),
        ]
    )
    table = pa.table(
        {
            "image_id": pa.array([3], pa.int32()),
            "image_uri": pa.array(["a.png"], pa.large_string()),
            "width": pa.array([64.0]),
            "annotations": pa.array(
                [[{"id": 1, "bbox": [4, 4, 20, 12], "iscrowd": True, "category_id": 2}]], pa.list_(narrow)
            ),
        }
    )
    (task,) = read_manifest(str(manifest_file(tmp_path / "m.parquet", table))).tasks.to_pylist()
    assert task["image_id"] == 3 and task["width"] == 64 and task["height"] is None
    assert task["bboxes"] == [BOX] and task["iscrowd"] == [1] and task["category_ids"] == [2]
    assert MANIFEST_ANNOTATION.field("id").type == pa.int64()


# ---------------------------------------------------------------- bounded rows


def test_annotations_per_row_bounds_the_packed_masks_of_a_row() -> None:
    sizes = np.array(
        [[64, 48], [640, 480], [4000, 3000], [100_000, 100_000], [0, 0], [-1, 5], [2**40, 2**40]]
    )
    limits = annotations_per_row(sizes[:, 0], sizes[:, 1])
    assert limits.tolist() == [
        MAX_ANNOTATIONS_PER_ROW,
        MAX_ANNOTATIONS_PER_ROW,
        ROW_MASK_PIXELS // (4000 * 3000),
        1,
        ANNOTATIONS_PER_ROW_OF_UNKNOWN_SIZE,
        ANNOTATIONS_PER_ROW_OF_UNKNOWN_SIZE,
        1,
    ]
    packed_bytes = limits[:4] * sizes[:4, 0] * sizes[:4, 1] / 8
    assert (packed_bytes[:3] <= ROW_MASK_PIXELS / 8).all() and ROW_MASK_PIXELS / 8 <= 64 * 2**20


def test_an_image_with_many_boxes_is_split_into_bounded_rows_in_order(tmp_path: Path) -> None:
    many, unknown, big = 10_000, 200, 30
    images = [image(1, "a.png"), image(2, "b.png"), {"id": 3, "file_name": "c.png"}]
    images.append(image(4, "d.png", width=8000, height=8000))
    annotations = [annotation(k, 1 if k % 100 else 2) for k in range(many)]
    annotations += [annotation(many + k, 3) for k in range(unknown)]
    annotations += [annotation(many + unknown + k, 4) for k in range(big)]
    tasks = read_manifest(str(coco_file(tmp_path / "coco.json", images, annotations))).tasks
    rows = tasks.to_pylist()
    sizes = [(row["image_id"], len(row["ann_ids"])) for row in rows]
    first, second = 9_900, 100
    per_big = ROW_MASK_PIXELS // (8000 * 8000)
    assert sizes == (
        [(1, 256)] * (first // 256)
        + [(1, first % 256)]
        + [(2, second)]
        + [(3, 64)] * (unknown // 64)
        + [(3, unknown % 64)]
        + [(4, per_big)] * (big // per_big)
        + ([(4, big % per_big)] if big % per_big else [])
    )
    positions = [position for row in rows for position in row["ann_indices"]]
    assert sorted(positions) == list(range(len(annotations))) and len(positions) == len(set(positions))
    for row in rows:  # a row's annotations are its image's, in file order
        assert row["ann_indices"] == sorted(row["ann_indices"])
        assert all(annotations[p]["image_id"] == row["image_id"] for p in row["ann_indices"])
        assert row["ann_ids"] == [annotations[p]["id"] for p in row["ann_indices"]]
    assert image_count(tasks) == 4 and annotation_count(tasks) == len(annotations)
    # --limit counts images: every row of each
    assert [row["image_id"] for row in first_images(tasks, 1).to_pylist()] == [1] * (first // 256 + 1)
    assert image_count(first_images(tasks, 3)) == 3 and first_images(tasks, 10).num_rows == tasks.num_rows


def test_task_rows_carry_the_file_name_as_the_input_writes_it(tmp_path: Path) -> None:
    images = [image(1, "sub/a.png"), image(2, "s3://bucket/b.png"), image(3, "")]
    annotations = [annotation(k, image_id) for k, image_id in enumerate([1, 2, 3, 9])]
    path = coco_file(tmp_path / "coco.json", images, annotations)
    tasks = read_manifest(str(path), "/data/root").tasks.to_pylist()
    assert [(t["image_id"], t["file_name"], t["image_uri"]) for t in tasks] == [
        (1, "sub/a.png", "/data/root/sub/a.png"),  # not the resolved path
        (2, "s3://bucket/b.png", "s3://bucket/b.png"),
        (3, None, None),  # no usable name
        (9, None, None),  # no record
    ]
    rows = good_manifest_rows() + [good_manifest_rows()[0] | {"image_id": 8, "image_uri": None}]
    path = manifest_file(tmp_path / "m.parquet", pa.Table.from_pylist(rows, schema=PARQUET_MANIFEST))
    tasks = read_manifest(str(path)).tasks.to_pylist()
    assert [(t["file_name"], t["image_uri"]) for t in tasks] == [
        ("a.png", str(tmp_path / "a.png")),
        (None, None),
    ]
