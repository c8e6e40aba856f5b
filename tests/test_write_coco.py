"""annotations.json written by streaming the input and merging OUT's parts by position (issue 14,
item 3): the same JSON as the input parsed whole with the rows applied, from parts sorted or not,
in many shuffled parts, for files orjson cannot read, on S3, in memory that does not grow with the file.
Only accepted rows give their refined mask (the policy's `accepted`, null taken as true, or a
person's decision over it); the others keep the original. Expected values are computed here from the
input and the rows, not by the writer's code."""

from __future__ import annotations

import json
import math
import random
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hqsam.hqsam_core import storage
from hqsam.pipeline import json_walk, sorted_rows
from hqsam.pipeline.write_coco import AnnotationFileError, OutputMismatchError, write_coco
from hqsam.pipeline.write_parquet import WriteParquetParts, write_atomically
from hqsam.schemas.refined import REFINED_ANNOTATION
from hqsam.schemas.status import Status

ODD_FLOATS = [0.1, 1e-7, 1e20, -0.0, 123456789.123, 2.5e-308, 1.7976931348623157e308, 3.0]


def coco_of(images: int, per_image: int, seed: int = 0, note: int = 0) -> dict:
    rng = random.Random(seed)
    annotations = []
    for position in range(images * per_image):
        image_id = rng.randrange(images)  # annotations not grouped by image, ids repeat
        annotations.append(
            {"id": position % 7, "image_id": image_id, "category_id": 1, "iscrowd": 0}
            | {"bbox": [rng.choice(ODD_FLOATS), 2, 3.25, 4], "area": 12}
            | {"segmentation": [[1.5, 2.0, 3.0, 4.0, 5.0, 6.0]], "attributes": {"é": [None, True, "ü"]}}
            | ({"note": "n" * note} if note else {})
        )
    return {
        "info": {"description": "ünïcode", "version": 1.0},
        "images": [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in range(images)],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}],
        "version": 3,
    }


def rows_for(coco: dict, positions, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for position in positions:
        ok = rng.random() < 0.7
        counts = "".join(rng.choice("abcdef0123") for _ in range(rng.randrange(5, 40)))
        rows.append(
            {"image_id": coco["annotations"][position]["image_id"], "ann_index": position}
            | {"annotation_id": 0, "status": "ok" if ok else "image_missing", "model": "vit_tiny"}
            | {"segmentation": {"size": [48, 64], "counts": counts} if ok else None}
            | {
                "bbox": [rng.choice(ODD_FLOATS), 1.0, 2.0, 3.0] if ok else None,
                "area": rng.randrange(99) if ok else None,
            }
            | {
                "score": float(np.float32(rng.random())) if ok else None,
                "error": None if ok else "no image record",
            }
            | {"iou_vs_original": 0.5 if ok else None, "boundary_iou_vs_original": None}
            # the policy's verdict: accepted, rejected, or none (an OUT written before the policy)
            | {"accepted": (True, False, None)[position % 3] if ok else None}
        )
    return rows


def write_parts(out: Path, groups: list[list[dict]], sort: bool) -> list[Path]:
    """One part per group, named in group order; sorted and declared so as the sink writes them,
    or in the group's own order without a declaration (parts written before they were sorted)."""
    (out / "rows").mkdir(parents=True, exist_ok=True)
    paths = []
    for number, group in enumerate(groups):
        table = pa.Table.from_pylist(group, schema=REFINED_ANNOTATION)
        path = out / "rows" / f"part-{number:05d}.parquet"
        if sort:
            write_atomically(str(path), table.sort_by("ann_index"), sorted_by_position=True)
        else:
            pq.write_table(table, path)
        paths.append(path)
    return paths


def expected_of(
    coco: dict, groups: list[list[dict]], only_processed: bool = False, decisions: dict | None = None
) -> dict:
    """The input with every row applied at its position; of two rows at one position, the later in
    part order wins (as the writer before streaming did). An ok row's mask replaces the original
    when a person accepted it (`decisions`), or nobody decided and the policy did not reject it."""
    expected = json.loads(json.dumps(coco))
    at = {row["ann_index"]: row for group in groups for row in group}
    decisions = decisions or {}
    for position, annotation in enumerate(expected["annotations"]):
        row = at.get(position)
        if row is None:
            continue
        taken, by = False, "policy"
        if row["status"] == "ok":
            if position in decisions:
                taken, by = decisions[position], "person"
            else:
                taken = row.get("accepted") is not False
        if taken:
            annotation |= {key: row[key] for key in ("segmentation", "area", "bbox")}
        keys = ("score", "status", "error", "iou_vs_original", "boundary_iou_vs_original", "model")
        annotation["hqsam"] = {key: row[key] for key in keys} | {"accepted": taken, "decided_by": by}
    if only_processed:
        ids = {row["image_id"] for group in groups for row in group}
        expected["images"] = [image for image in expected["images"] if image["id"] in ids]
        expected["annotations"] = [a for p, a in enumerate(expected["annotations"]) if p in at]
    return expected


def write_input(path: Path, coco: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(coco))
    return str(path)


def shuffled_groups(rows: list[dict], parts: int, seed: int = 2) -> list[list[dict]]:
    rng = random.Random(seed)
    rows = rows[:]
    rng.shuffle(rows)
    return [rows[k::parts] for k in range(parts)]


@pytest.mark.parametrize("sort", [True, False])
def test_rows_in_many_shuffled_parts_land_at_their_positions_as_orjson_writes_them(tmp_path, sort) -> None:
    coco = coco_of(40, 5)
    rows = rows_for(coco, range(0, 200, 1))
    groups = shuffled_groups(rows, 13)
    groups[-1].append(rows_for(coco, [17], seed=9)[0])  # a second row at position 17: the later part's wins
    write_parts(tmp_path / "out", groups, sort)
    uri = write_coco(write_input(tmp_path / "coco.json", coco), str(tmp_path / "out"))
    written = Path(uri).read_bytes()
    expected = expected_of(coco, groups)
    assert json.loads(written) == expected
    # floats and every other value as the same text orjson writes for the input parsed whole
    members = [orjson.dumps(k) + b":" + orjson.dumps(v) for k, v in expected.items() if k != "annotations"]
    annotations = b",\n".join(orjson.dumps(a) for a in expected["annotations"])
    members.insert(2, b'"annotations":[' + annotations + b"]")
    assert written == b"{" + b",".join(members) + b"}\n"
    keys = ("score", "status", "error", "iou_vs_original", "boundary_iou_vs_original", "model")
    assert {k: expected["annotations"][17]["hqsam"][k] for k in keys} == {k: groups[-1][-1][k] for k in keys}


@pytest.mark.parametrize("sort", [True, False])
def test_a_merge_over_more_than_fan_in_parts_gives_the_same_output(tmp_path, monkeypatch, sort) -> None:
    coco = coco_of(40, 5)
    groups = shuffled_groups(rows_for(coco, range(200)), 13)
    groups[-1] += rows_for(coco, [17, 17, 60], seed=9)  # the last of two rows in one part wins
    monkeypatch.setattr(sorted_rows, "ROW_GROUP_ROWS", 2)  # repeated positions straddle row groups
    write_parts(tmp_path / "out", groups, sort)
    first = pq.ParquetFile(tmp_path / "out" / "rows" / "part-00000.parquet")
    assert first.num_row_groups == (8 if sort else 1)
    source = write_input(tmp_path / "coco.json", coco)
    at_once = Path(write_coco(source, str(tmp_path / "out"))).read_bytes()
    merges = []
    merge_into = sorted_rows._merge_into
    monkeypatch.setattr(sorted_rows, "_merge_into", lambda *args: merges.append(args) or merge_into(*args))
    monkeypatch.setattr(sorted_rows, "FAN_IN", 3)
    in_steps = Path(write_coco(source, str(tmp_path / "out"))).read_bytes()
    assert len(merges) == 5 + 2  # 13 parts merged into 5 files, those into 2, then merged
    assert in_steps == at_once
    written = json.loads(in_steps)
    assert written == expected_of(coco, groups)
    assert written["annotations"][17]["hqsam"]["score"] == groups[-1][-2]["score"]


def test_a_rejected_row_keeps_its_original_and_a_person_decides_over_the_policy(tmp_path) -> None:
    coco = coco_of(10, 3)
    rows = rows_for(coco, range(30))
    ok = [row for row in rows if row["status"] == "ok"]
    accepted = next(row for row in ok if row["accepted"] is True)
    refused = next(row for row in ok if row["accepted"] is False)
    unjudged = next(row for row in ok if row["accepted"] is None)
    failed = next(row for row in rows if row["status"] != "ok")
    write_parts(tmp_path / "out", shuffled_groups(rows, 3), sort=True)
    source = write_input(tmp_path / "coco.json", coco)

    written = json.loads(Path(write_coco(source, str(tmp_path / "out"))).read_text())["annotations"]
    assert written == expected_of(coco, [rows])["annotations"]
    for row, taken in ((accepted, True), (refused, False), (unjudged, True), (failed, False)):
        annotation, original = written[row["ann_index"]], coco["annotations"][row["ann_index"]]
        assert annotation["hqsam"]["accepted"] is taken and annotation["hqsam"]["decided_by"] == "policy"
        for key in ("segmentation", "bbox", "area"):
            assert annotation[key] == (row[key] if taken else original[key]), (key, taken)

    decisions = {accepted["ann_index"]: False, refused["ann_index"]: True}
    (tmp_path / "out" / "annotations.json").unlink()
    tally = Counter()
    to = f"{tmp_path}/final/coco.json"
    uri = write_coco(source, str(tmp_path / "out"), decisions=decisions, to=to, tally=tally)
    assert uri == to and not (tmp_path / "out" / "annotations.json").exists()
    written = json.loads(Path(uri).read_text())
    assert written == expected_of(coco, [rows], decisions=decisions)
    assert (
        written["annotations"][accepted["ann_index"]]["segmentation"]
        == coco["annotations"][0]["segmentation"]
    )
    assert written["annotations"][refused["ann_index"]]["segmentation"] == refused["segmentation"]
    assert written["annotations"][refused["ann_index"]]["hqsam"]["decided_by"] == "person"
    policy_taken = sum(1 for row in ok if row["accepted"] is not False) - 1
    assert tally == Counter(
        {
            ("person", True): 1,
            ("person", False): 1,
            ("policy", True): policy_taken,
            ("policy", False): len(ok) - 2 - policy_taken,
            ("status", False): len(rows) - len(ok),
        }
    )


def test_parts_written_before_the_policy_take_every_ok_row(tmp_path) -> None:
    coco = coco_of(6, 3)
    rows = rows_for(coco, range(18))
    old = pa.schema([field for field in REFINED_ANNOTATION if field.name not in ("accepted", "rejected_by")])
    (tmp_path / "out" / "rows").mkdir(parents=True)
    table = pa.Table.from_pylist(
        [{k: v for k, v in row.items() if k != "accepted"} for row in rows], schema=old
    )
    write_atomically(str(tmp_path / "out" / "rows" / "part-00000.parquet"), table, sorted_by_position=True)
    pq.write_table(table.slice(0, 0), tmp_path / "out" / "rows" / "part-00001.parquet")  # unsorted, empty
    written = json.loads(
        Path(write_coco(write_input(tmp_path / "coco.json", coco), str(tmp_path / "out"))).read_text()
    )
    for row in rows:
        row["accepted"] = None
    assert written == expected_of(coco, [rows])
    assert sum(a["hqsam"]["accepted"] for a in written["annotations"]) == sum(
        r["status"] == "ok" for r in rows
    )


def test_only_processed_images_keeps_the_images_and_annotations_with_rows(tmp_path) -> None:
    coco = coco_of(30, 4)
    chosen = [p for p, a in enumerate(coco["annotations"]) if a["image_id"] < 10]
    groups = shuffled_groups(rows_for(coco, chosen), 4)
    write_parts(tmp_path / "out", groups, sort=True)
    uri = write_coco(
        write_input(tmp_path / "coco.json", coco), str(tmp_path / "out"), only_processed_images=True
    )
    written = json.loads(Path(uri).read_text())
    assert written == expected_of(coco, groups, only_processed=True)
    kept = {image["id"] for image in written["images"]}
    assert kept == {coco["annotations"][p]["image_id"] for p in chosen} and kept and max(kept) < 10


@pytest.mark.parametrize("position", ["beyond", "other_image", "negative"])
def test_a_row_the_file_does_not_have_is_refused_and_nothing_is_written(tmp_path, position) -> None:
    coco = coco_of(10, 3)
    rows = rows_for(coco, range(30))
    stray = dict(rows[4])
    stray["ann_index"] = {"beyond": 30, "other_image": 4, "negative": -1}[position]
    if position == "other_image":
        stray["image_id"] = coco["annotations"][4]["image_id"] + 1
    write_parts(tmp_path / "out", [*shuffled_groups(rows, 3), [stray]], sort=True)
    with pytest.raises(OutputMismatchError) as refused:
        write_coco(write_input(tmp_path / "coco.json", coco), str(tmp_path / "out"))
    assert f"annotation #{stray['ann_index']} of image {stray['image_id']}" in str(refused.value)
    assert not (tmp_path / "out" / "annotations.json").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["rows"]  # no temp file left


def test_files_orjson_cannot_read_are_written_from_the_whole_file(tmp_path) -> None:
    coco = coco_of(6, 3)
    coco["annotations"][7]["bbox"] = [math.nan, 1, 2, 3]  # late in the file: after streaming began
    coco["categories"][0]["code"] = 2**70
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    groups = shuffled_groups(rows_for(coco, range(18)), 3)
    write_parts(tmp_path / "out", groups, sort=True)
    written = json.loads((Path(write_coco(str(path), str(tmp_path / "out")))).read_text())
    expected = expected_of(coco, groups)
    if not expected["annotations"][7]["hqsam"]["accepted"]:  # the original bbox is kept
        expected["annotations"][7]["bbox"] = [None, 1, 2, 3]  # NaN is written as null
    assert written == expected and written["categories"][0]["code"] == 2**70


def test_a_file_that_is_no_json_is_refused_and_nothing_is_written(tmp_path) -> None:
    coco = coco_of(10, 3)
    text = orjson.dumps(coco)
    cut = text.index(b'"categories"')  # broken after its annotations were streamed out
    path = tmp_path / "coco.json"
    path.write_bytes(text[:cut] + b"[" + text[cut:])
    write_parts(tmp_path / "out", shuffled_groups(rows_for(coco, range(30)), 3), sort=True)
    with pytest.raises(AnnotationFileError) as refused:
        write_coco(str(path), str(tmp_path / "out"))
    assert str(refused.value).startswith(f"{path} is not valid JSON (")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["rows"]


def test_a_top_level_key_written_twice_keeps_its_last_value(tmp_path) -> None:
    path = tmp_path / "coco.json"
    path.write_text('{"info": 1, "images": [], "annotations": [{"id": 1, "image_id": 1}], "info": {"v": 2}}')
    (tmp_path / "out").mkdir()
    written = json.loads(Path(write_coco(str(path), str(tmp_path / "out"))).read_text())
    assert written == {"info": {"v": 2}, "images": [], "annotations": [{"id": 1, "image_id": 1}]}


def encoded_row(image_id: int, positions: list[int]) -> dict:
    """An IMAGE_JUDGED row of an image without a record: every annotation image_missing."""
    count = len(positions)
    return {"image_id": image_id, "image_uri": None, "file_name": None, "height": None, "width": None} | {
        "ann_ids": positions, "ann_indices": positions, "category_ids": [1] * count,
        "iscrowd": [0] * count, "prompts": np.full((count, 4), np.nan),
        "statuses": [Status.IMAGE_MISSING] * count, "errors": ["no image record"] * count,
        "scores": [math.nan] * count, "rle_counts": [""] * count,
        "refined_bboxes": np.zeros((count, 4)), "areas": [-1] * count,
        "ious": [math.nan] * count, "boundary_ious": [math.nan] * count,
        "stabilities": [math.nan] * count, "sam_hq_ious": [math.nan] * count,
        "prompt_kinds": [""] * count, "accepted": [-1] * count, "rejected_by": [""] * count,
    }  # fmt: skip


def test_the_sink_writes_parts_sorted_by_position_and_says_so(tmp_path) -> None:
    WriteParquetParts(str(tmp_path), "vit_tiny").process(
        [encoded_row(1, [9, 4]), encoded_row(2, [7]), encoded_row(3, [1, 8])]
    )
    (part,) = (tmp_path / "rows").iterdir()
    assert pq.read_table(part)["ann_index"].to_pylist() == [1, 4, 7, 8, 9]
    assert sorted_rows._declared_sorted(pq.ParquetFile(part).metadata)
    old = tmp_path / "old.parquet"
    pq.write_table(pq.read_table(part), old)
    assert not sorted_rows._declared_sorted(pq.ParquetFile(old).metadata)


def _peak_bytes(tmp_path: Path, images: int) -> int:
    coco = coco_of(images, 10, seed=images, note=1000)  # files of many windows of the walk (below)
    annotations = write_input(tmp_path / f"in{images}" / "coco.json", coco)
    out = tmp_path / f"out{images}"
    write_parts(out, shuffled_groups(rows_for(coco, range(images * 10)), 8), sort=True)
    del coco
    tracemalloc.start()
    try:
        write_coco(annotations, str(out))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_annotations(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(json_walk, "WINDOW", 2**16)  # what the walk parses at a time: both files hold many
    small, large = _peak_bytes(tmp_path, 150), _peak_bytes(tmp_path, 750)  # 1.5k, 7.5k annotations
    assert large < 1.5 * small + 2**20, (small, large)


def test_annotations_json_on_s3(s3_bucket, tmp_path) -> None:
    coco = coco_of(12, 3)
    groups = shuffled_groups(rows_for(coco, range(36)), 4)
    local = tmp_path / "out"
    for path in write_parts(local, groups, sort=True):
        storage.write_bytes(f"s3://{s3_bucket}/out/rows/{path.name}", path.read_bytes())
    annotations = f"s3://{s3_bucket}/in/coco.json"
    storage.write_bytes(annotations, orjson.dumps(coco))
    uri = write_coco(annotations, f"s3://{s3_bucket}/out", only_processed_images=True)
    assert uri == f"s3://{s3_bucket}/out/annotations.json"
    assert json.loads(storage.read_bytes(uri)) == expected_of(coco, groups, only_processed=True)


def test_the_sink_writes_a_missing_text_that_arrives_as_nan_as_null(tmp_path) -> None:
    """A whole Ray block kept as pandas hands a missing file name or URI over as NaN, not None: the
    sink wrote nothing for it (ArrowTypeError), and the run then hung refining its rows again."""
    row = encoded_row(5, [0, 1]) | {"image_uri": math.nan, "file_name": np.float64("nan")}
    row |= {"height": math.nan, "width": math.nan}
    WriteParquetParts(str(tmp_path), "vit_tiny").process([row])
    (part,) = (tmp_path / "rows").iterdir()
    table = pq.read_table(part)
    assert table["image_uri"].to_pylist() == [None, None] and table["file_name"].to_pylist() == [None, None]
    assert table["status"].to_pylist() == ["image_missing"] * 2
