"""The streaming COCO reader (pipeline/stream_coco.py, `hqsam manifest`) writes exactly the task
rows of read_manifest, in its order, refuses what it refuses in the same words, and holds far less
memory on a large file."""

from __future__ import annotations

import json
import math
import random
import tracemalloc
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hqsam.jobs.cli import app
from hqsam.pipeline import json_walk, manifest
from hqsam.pipeline import stream_coco as streaming
from hqsam.pipeline.manifest import (
    MAX_ANNOTATIONS_PER_ROW,
    ManifestError,
    duplicate_annotation_ids,
    first_images,
    read_manifest,
)
from hqsam.pipeline.stream_coco import TASKS_RECORD, StreamedManifest, read_task_folder, stream_coco
from hqsam.schemas.manifest import PARQUET_MANIFEST
from hqsam.schemas.refine_rows import IMAGE_TASK
from tests.conftest import ROOT, SHARED_FIXTURES, shared_fixture
from tests.test_manifest_inputs import (
    COCO_REFUSALS,
    annotation,
    coco_file,
    good_manifest_rows,
    image,
    parquet_refusals,
)


def streamed(path: str, out: str, images_root: str | None = None) -> pa.Table:
    result = stream_coco(path, out, images_root=images_root)
    parts = sorted(result.parts)
    assert parts == result.parts
    assert read_task_folder(out) == result  # the record, read back
    tables = [pq.read_table(part) for part in parts]
    table = pa.concat_tables(tables) if tables else IMAGE_TASK.empty_table()
    assert table.schema.equals(IMAGE_TASK) and table.num_rows == result.rows
    assert result.annotations == sum(len(ids) for ids in table["ann_ids"].to_pylist())
    assert result.images == len(set(table["image_id"].to_pylist()))
    return table


def assert_same_rows(path: Path, tmp_path: Path, images_root: str | None = None) -> pa.Table:
    want = read_manifest(str(path), images_root).tasks
    got = streamed(str(path), str(tmp_path / "out"), images_root)
    assert got.to_pylist() == want.to_pylist()
    return got


def test_the_fixtures_and_the_example_stream_into_the_same_rows(tmp_path: Path) -> None:
    shared_fixture("")
    files = sorted(SHARED_FIXTURES.rglob("*.json")) + [ROOT / "examples/shapes/annotations.json"]
    checked = 0
    for number, path in enumerate(files):
        try:
            head = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(head, dict) and "annotations" in head:
            assert assert_same_rows(path, tmp_path / str(number)).num_rows
            assert_same_rows(path, tmp_path / f"{number}-root", images_root="s3://bucket/images")
            checked += 1
    assert checked >= 2


def mixed_file(path: Path, images: int = 40, seed: int = 0) -> Path:
    """Repeated image records, an image with more than 256 annotations, annotations of ids without
    a record, odd values (no file name, text sizes, broken boxes, crowd flags, polygons)."""
    rng = random.Random(seed)
    records = [image(i, f"img/{i}.png", width=rng.choice([64, 5000, "big", None])) for i in range(images)]
    records += [image(3, "img/3.png", width=32, height=16), image(70, ""), image(5, "img/5.png", width=None)]
    records.insert(10, image(99, None))
    annotations = []
    for position in range(3000):
        image_id = 1 if position % 5 == 0 else rng.choice([*range(images), 70, 99, 1000 + position % 7])
        annotations.append(
            annotation(
                position % 900,
                image_id,
                bbox=rng.choice([[1, 2, 3, 4], [1.5, 2, 3, 4], [1, 2], "x", None, [1, 2, "a", 4]]),
                iscrowd=rng.choice([0, 1, True, 2.5, None, "1"]),
                category_id=rng.choice([1, None, 2.5, "c"]),
                segmentation=rng.choice([None, [], [[1, 2, 3, 4, 5, 6]], {"counts": "ab", "size": [2, 2]}]),
            )
        )
    return coco_file(path, records, annotations)


def test_generated_files_stream_into_the_same_rows(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(json_walk, "WINDOW", 700)  # many windows...
    monkeypatch.setattr(streaming, "SPILL_BYTES", 4096)  # ...and many ranges of image rows
    for seed in range(3):
        got = assert_same_rows(mixed_file(tmp_path / f"coco{seed}.json", seed=seed), tmp_path / str(seed))
        image_one = [
            len(ids)
            for image_id, ids in zip(got["image_id"].to_pylist(), got["ann_ids"].to_pylist())
            if image_id == 1
        ]
        assert len(image_one) > 1 and max(image_one) <= MAX_ANNOTATIONS_PER_ROW
        assert got["image_uri"].null_count > 0  # annotations without a record
    without_images = tmp_path / "no_images.json"
    without_images.write_text(json.dumps({"annotations": [annotation(i, i % 3) for i in range(10)]}))
    assert_same_rows(without_images, tmp_path / "no_images")
    images_last = tmp_path / "images_last.json"
    images_last.write_text(
        f'{{"annotations": [{json.dumps(annotation(1, 2))}], "images": [{json.dumps(image(2))}]}}'
    )
    assert_same_rows(images_last, tmp_path / "images_last")
    empty = coco_file(tmp_path / "empty.json", [image(1)], [])
    assert_same_rows(empty, tmp_path / "empty")


def test_repeated_root_keys_count_as_orjson_reads_them_the_last(tmp_path: Path, monkeypatch) -> None:
    """Images after the annotations, and a later 'images' or 'annotations' key replacing an
    earlier one (the annotations are then read a second time, with the last images)."""
    monkeypatch.setattr(json_walk, "WINDOW", 300)
    first = json.dumps([image(i, f"first/{i}.png") for i in range(6)])
    last = json.dumps([image(i, f"last/{i}.png", width=5000, height=4000) for i in range(2, 9)])
    old = json.dumps([annotation(i, i % 4) for i in range(50)])
    new = json.dumps([annotation(100 + i, (i * 7) % 11, category_id=i) for i in range(400)])
    texts = {
        "images last": f'{{"annotations": {new}, "info": {{"a": [1, {{"b": "}}],"}}]}}, "images": {last}}}',
        "images twice": f'{{"images": {first}, "annotations": {new}, "images": {last}}}',
        "images then null": f'{{"images": {first}, "annotations": {new}, "images": null}}',
        "annotations twice": f'{{"images": {first}, "annotations": {old}, "images": {last}, "annotations": {new}}}',
        "annotations replaced by a list": f'{{"annotations": 5, "images": {first}, "annotations": {new}}}',
    }
    for number, (case, text) in enumerate(texts.items()):
        path = tmp_path / f"{number}.json"
        path.write_text(text)
        got = assert_same_rows(path, tmp_path / str(number))
        assert got.num_rows and stream_coco(str(path), str(tmp_path / f"{number}-b")).positions == 400, case
    refused = tmp_path / "refused.json"
    refused.write_text(f'{{"images": {first}, "annotations": {new}, "annotations": 5}}')
    assert refusal(lambda: stream_coco(str(refused), str(tmp_path / "r"))) == refusal(
        lambda: read_manifest(str(refused))
    )


def part_tables(result: StreamedManifest) -> list[pa.Table]:
    return [pq.read_table(part) for part in result.parts]


def test_parts_hold_whole_images_and_at_most_rows_per_part(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(streaming, "PARTS", 12)  # few parts...
    monkeypatch.setattr(streaming, "SPILL_BYTES", 2048)  # ...across many ranges of image rows
    monkeypatch.setattr(streaming, "MIN_ROWS_PER_PART", 8)
    monkeypatch.setattr(streaming, "FIRST_PART_ROWS", 10**9)  # no small first parts here
    records = [image(i, f"{i}.png", width=None if i == 5 else 64) for i in range(90)]
    # image 5 (size unknown: 64 annotations a row) gets 11 rows, more than a part's 9
    annotations = [annotation(n, 5 if n < 700 else n % 90) for n in range(1000)]
    path = coco_file(tmp_path / "coco.json", records, annotations)
    result = stream_coco(str(path), str(tmp_path / "out"))
    tables = part_tables(result)
    got = pa.concat_tables(tables)
    assert got.to_pylist() == read_manifest(str(path)).tasks.to_pylist()
    per_part = max(8, math.ceil(got.num_rows / 12))
    assert per_part == 9 and 12 <= len(tables) <= 2 * 12 + 1
    assert read_task_folder(str(tmp_path / "out")) == result
    seen: set[int] = set()
    for table in tables:
        ids = table["image_id"].to_pylist()
        assert not seen & set(ids), "an image split across parts"
        seen |= set(ids)
        assert len(ids) <= per_part or len(set(ids)) == 1, (len(ids), per_part)
    assert any(len(t) > per_part for t in tables)  # image 5's rows make a part of their own
    assert sum(len(t) for t in tables[:-1]) / (len(tables) - 1) > per_part / 2  # parts are filled
    record = json.loads((tmp_path / "out" / TASKS_RECORD).read_text())
    assert record["parts"] == [f"part-{n:05d}.parquet" for n in range(len(tables))]
    assert record["rows"] == got.num_rows and record["source"] == str(path) and record["limit"] is None
    assert record["positions"] == 1000 == record["annotations"] and record["images"] == 90


def test_the_first_parts_are_small_and_double_in_size(tmp_path: Path, monkeypatch) -> None:
    """Small first parts bring the first refined rows back soon; they grow to the part size."""
    monkeypatch.setattr(streaming, "MIN_ROWS_PER_PART", 40)
    records = [image(i, f"{i}.png") for i in range(200)]
    annotations = [annotation(n, n % 200) for n in range(400)]  # one task row per image
    path = coco_file(tmp_path / "coco.json", records, annotations)
    tables = part_tables(stream_coco(str(path), str(tmp_path / "out")))
    assert [len(table) for table in tables] == [1, 2, 4, 8, 16, 32, 40, 40, 40, 17]
    assert pa.concat_tables(tables).to_pylist() == read_manifest(str(path)).tasks.to_pylist()


def test_limit_keeps_the_first_images_as_first_images_does(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(streaming, "SPILL_BYTES", 4096)
    path = mixed_file(tmp_path / "coco.json")
    tasks = read_manifest(str(path)).tasks
    images = len(set(tasks["image_id"].to_pylist()))
    for limit in (1, 2, 7, images - 1, images, images + 5):
        result = stream_coco(str(path), str(tmp_path / str(limit)), limit=limit)
        want = first_images(tasks, limit)
        assert pa.concat_tables(part_tables(result)).to_pylist() == want.to_pylist()
        assert result.images == min(limit, images) and result.rows == want.num_rows
        assert result.annotations == sum(len(ids) for ids in want["ann_ids"].to_pylist())
        assert result.positions == 3000 and result.limit == limit
        assert result.duplicate_annotation_ids == duplicate_annotation_ids(want)
        assert read_task_folder(str(tmp_path / str(limit))) == result


def test_duplicate_ids_are_counted_bucket_by_bucket_as_in_the_manifest(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(streaming, "ID_BUCKET_BYTES", 1000)  # many buckets of ids
    path = mixed_file(tmp_path / "coco.json")
    counts = Counter(a["id"] for a in json.loads(path.read_text())["annotations"])
    repeated = sorted(i for i, n in counts.items() if n > 1)
    want = {"ids": len(repeated), "annotations": sum(counts[i] for i in repeated), "examples": repeated[:5]}
    result = stream_coco(str(path), str(tmp_path / "out"))
    assert result.duplicate_annotation_ids == want == duplicate_annotation_ids(read_manifest(str(path)).tasks)
    unique = coco_file(tmp_path / "unique.json", [image(1)], [annotation(i, 1) for i in range(20)])
    none = {"ids": 0, "annotations": 0, "examples": []}
    assert stream_coco(str(unique), str(tmp_path / "u")).duplicate_annotation_ids == none


def test_read_task_folder_is_none_without_a_record(tmp_path: Path) -> None:
    path = mixed_file(tmp_path / "coco.json")
    result = stream_coco(str(path), str(tmp_path / "out"), images_root="/data", limit=3)
    assert read_task_folder(str(tmp_path / "out") + "/") == result
    assert (
        StreamedManifest.from_record(json.loads(json.dumps(result.record())), str(tmp_path / "out")) == result
    )
    (tmp_path / "out" / TASKS_RECORD).unlink()  # parts without a record: an incomplete folder
    assert read_task_folder(str(tmp_path / "out")) is None
    assert read_task_folder(str(path)) is None and read_task_folder(str(tmp_path / "missing")) is None


def test_text_that_looks_like_structure_is_read_as_orjson_reads_it(tmp_path: Path, monkeypatch) -> None:
    """Strings holding '},' quotes and backslashes, nested lists of objects, white space, an
    annotation longer than the window: the window cuts never fall inside them."""
    monkeypatch.setattr(json_walk, "WINDOW", 64)
    tricky = ['a},{"b', 'q\\"},', "\\", '"},]', "}, {", "\u00e9\u2603 \ud83d\ude00"]
    records = [image(i, f"{i}-{tricky[i % len(tricky)]}.png") for i in range(12)]
    annotations = [
        annotation(n, n % 14, note=tricky[n % len(tricky)], parts=[{"x": "},"}, {"y": [1, {"z": "]"}]}])
        | ({"segmentation": [[float(v) for v in range(400)]]} if n == 7 else {})
        for n in range(60)
    ]
    text = json.dumps(
        {"info": {"s": "],}{"}, "images": records, "n": -1.5e3, "annotations": annotations}, indent=1
    )
    for number, variant in enumerate([text, text.replace("\n", " \t\r\n "), f" \n{text}\n "]):
        assert assert_same_rows(
            coco_file(tmp_path / f"{number}.json", [], [], variant), tmp_path / str(number)
        )


BROKEN = {
    "truncated in a string": '{"images": [], "annotations": [{"id": 1, "image_id": 1, "x": "ab',
    "two commas": '{"images": [], "annotations": [{"id": 1, "image_id": 1},, {"id": 2, "image_id": 1}]}',
    "trailing comma": '{"images": [], "annotations": [{"id": 1, "image_id": 1},]}',
    "only a comma": '{"images": [], "annotations": [,]}',
    "missing comma": '{"images": [] "annotations": []}',
    "more after the root": '{"images": [], "annotations": []} []',
    "bracket mismatch": '{"images": [], "annotations": [{"id": 1, "image_id": 1]}',
    "unquoted key": '{images: [], "annotations": []}',
    "bad refused later": '{"images": [], "annotations": [{"id": "x", "image_id": 1}], "z": [1 2]}',
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_json_anywhere_is_refused_as_broken_json(case: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(json_walk, "WINDOW", 16)
    path = tmp_path / "coco.json"
    path.write_text(BROKEN[case])
    want = refusal(lambda: read_manifest(str(path)))
    got = refusal(lambda: stream_coco(str(path), str(tmp_path / "out")))
    prefix = f"{path} is neither Parquet nor valid JSON ("
    assert want.startswith(prefix) and got.startswith(prefix) and "\n" not in got, got
    assert not list(tmp_path.glob("out/*"))


def parquet_manifests() -> dict[str, pa.Table]:
    """Every Parquet manifest of tests/test_manifest_inputs.py, read or refused there."""
    tables = {case: table for case, (table, _words) in parquet_refusals().items()}
    rows = [
        {"image_id": i % 7, "image_uri": f"{i % 7}.png", "width": 64 if i % 3 else None, "height": 48}
        | {
            "annotations": None
            if i % 5 == 4
            else [{"id": i * 10 + k, "bbox": [1, 2, 3, 4]} for k in range(i % 4)]
        }
        for i in range(40)
    ]
    tables["repeated image ids"] = pa.Table.from_pylist(rows, schema=PARQUET_MANIFEST)
    tables["good"] = pa.Table.from_pylist(good_manifest_rows(), schema=PARQUET_MANIFEST)
    return tables


@pytest.mark.parametrize("case", sorted(parquet_manifests()))
def test_parquet_manifests_stream_into_the_same_rows_or_refusal(
    case: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(streaming, "PARQUET_BATCH", 3)
    path = tmp_path / "manifest.parquet"
    pq.write_table(parquet_manifests()[case], path, row_group_size=5)
    try:
        want = read_manifest(str(path)).tasks
    except ManifestError as error:
        assert refusal(lambda: stream_coco(str(path), str(tmp_path / "out"))) == str(error)
        return
    got = streamed(str(path), str(tmp_path / "out"))
    assert got.to_pylist() == want.to_pylist() and got.num_rows


def test_a_folder_of_parquet_manifest_parts_is_one_manifest(tmp_path: Path, monkeypatch) -> None:
    """Parts in name order are one manifest: the rows of the same table as one file (repeated
    image ids across parts are one image; positions count on across parts)."""
    monkeypatch.setattr(streaming, "PARQUET_BATCH", 3)
    table = parquet_manifests()["repeated image ids"]
    whole = tmp_path / "manifest.parquet"
    pq.write_table(table, whole)
    folder = tmp_path / "parts"
    folder.mkdir()
    for number, start in enumerate(range(0, table.num_rows, 15)):
        pq.write_table(table.slice(start, 15), folder / f"part-{number:03d}.parquet", row_group_size=4)
    (folder / "_SUCCESS").write_bytes(b"")  # what Spark leaves: skipped, as Parquet readers skip it
    (folder / "_metadata.parquet").write_bytes(b"not read")
    got = streamed(str(folder), str(tmp_path / "out"))
    assert got.to_pylist() == read_manifest(str(whole)).tasks.to_pylist() and got.num_rows
    assert (
        read_task_folder(str(tmp_path / "out")).positions
        == pq.read_table(whole)["annotations"].combine_chunks().flatten().__len__()
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "without Parquet files" in refusal(lambda: stream_coco(str(empty), str(tmp_path / "out2")))


def test_a_parquet_manifest_is_read_a_batch_at_a_time(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(streaming, "PARQUET_BATCH", 3)
    path = tmp_path / "manifest.parquet"
    pq.write_table(parquet_manifests()["repeated image ids"], path, row_group_size=5)
    monkeypatch.setattr(manifest, "_tasks_from_parquet", None)  # read_manifest's whole read: unused
    result = stream_coco(str(path), str(tmp_path / "out"), limit=3)
    assert result.images == 3 and result.positions == 48
    assert [pq.read_metadata(part).num_rows for part in result.parts] == [1, 2]  # small first parts


def refusal(call) -> str:
    with pytest.raises(ManifestError) as refused:
        call()
    return str(refused.value)


@pytest.mark.parametrize("case", sorted(COCO_REFUSALS))
def test_refusals_are_the_same_sentences(case: str, tmp_path: Path) -> None:
    images, annotations, _ = COCO_REFUSALS[case]
    path = coco_file(tmp_path / "coco.json", images, annotations)
    assert refusal(lambda: stream_coco(str(path), str(tmp_path / "out"))) == refusal(
        lambda: read_manifest(str(path))
    )
    assert not list((tmp_path).glob("out/part-*"))


STRUCTURE_REFUSALS = {
    "root a list": "[1, 2]",
    "no annotations": '{"images": []}',
    "annotations an object": '{"images": [], "annotations": {"a": 1}}',
    "bad image before no annotations": '{"images": [null]}',
    "images an object before a bad annotation": '{"images": {"a": 1}, "annotations": [null]}',
    "a bad image after a bad annotation": '{"annotations": [null], "images": [{"id": "x"}]}',
    "two files for one id after a bad record": (
        '{"images": [{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}, null], "annotations": [1]}'
    ),
    "NaN with a bad id": '{"images": [], "annotations": [{"id": 1, "image_id": 18446744073709551616, "bbox": [NaN, 1, 2, 3]}]}',
    "does not exist": None,
}


@pytest.mark.parametrize("case", sorted(STRUCTURE_REFUSALS))
def test_refusals_of_structure_are_the_same_sentences(case: str, tmp_path: Path) -> None:
    path = tmp_path / "coco.json"
    if STRUCTURE_REFUSALS[case] is not None:
        path.write_text(STRUCTURE_REFUSALS[case])
    assert refusal(lambda: stream_coco(str(path), str(tmp_path / "out"))) == refusal(
        lambda: read_manifest(str(path))
    )


def test_broken_json_is_refused_in_one_sentence(tmp_path: Path) -> None:
    path = mixed_file(tmp_path / "coco.json")
    path.write_bytes(path.read_bytes()[:-100])
    message = refusal(lambda: stream_coco(str(path), str(tmp_path / "out")))
    assert "\n" not in message and message.startswith(f"{path} is neither Parquet nor valid JSON (")


def test_what_yajl_cannot_read_is_read_whole_like_read_manifest(tmp_path: Path) -> None:
    path = tmp_path / "nan.json"
    path.write_text(
        '{"images": [{"id": 1, "file_name": "a.png", "width": 1e400}], '
        '"annotations": [{"id": 1, "image_id": 1, "bbox": [NaN, 1, 2, Infinity]}, '
        '{"id": 2, "image_id": 1, "category_id": 18446744073709551616}]}'
    )
    got = streamed(str(path), str(tmp_path / "out"))
    want = read_manifest(str(path)).tasks
    assert str(got.to_pylist()) == str(want.to_pylist())  # NaN != NaN: compare the text


def test_a_folder_that_holds_parts_is_refused(tmp_path: Path) -> None:
    path = mixed_file(tmp_path / "coco.json")
    stream_coco(str(path), str(tmp_path / "out"))
    assert "already holds manifest parts" in refusal(lambda: stream_coco(str(path), str(tmp_path / "out")))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert "is not empty" in refusal(lambda: stream_coco(str(path), str(tmp_path / "other")))


def test_s3_in_and_out(s3_bucket: str, tmp_path: Path) -> None:
    import s3fs

    path = mixed_file(tmp_path / "coco.json")
    fs = s3fs.S3FileSystem()
    fs.put(str(path), f"{s3_bucket}/in/coco.json")
    s3fs.S3FileSystem.clear_instance_cache()
    source, out = f"s3://{s3_bucket}/in/coco.json", f"s3://{s3_bucket}/out"
    result = stream_coco(source, out)
    assert result.parts and all(part.startswith(out + "/part-") for part in result.parts)
    got = pa.concat_tables([pq.read_table(fs.open(part)) for part in result.parts])
    assert got.to_pylist() == read_manifest(source).tasks.to_pylist()
    assert got["image_uri"].drop_null()[0].as_py().startswith(f"s3://{s3_bucket}/in/img/")
    assert read_task_folder(out) == result and read_task_folder(f"s3://{s3_bucket}/in") is None


def test_the_command_writes_the_parts_and_reports(tmp_path: Path) -> None:
    path = mixed_file(tmp_path / "coco.json")
    result = CliRunner().invoke(
        app, ["manifest", str(path), str(tmp_path / "out"), "--images", "/data", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    want = read_manifest(str(path), "/data").tasks
    assert f"{want.num_rows} task rows" in result.output and "3000 annotations" in result.output
    got = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out").glob("part-*.parquet"))])
    assert got.to_pylist() == want.to_pylist()
    assert read_task_folder(str(tmp_path / "out")).rows == want.num_rows
    limited = CliRunner().invoke(
        app, ["manifest", str(path), str(tmp_path / "few"), "--limit", "3", "--no-progress"]
    )
    assert limited.exit_code == 0 and limited.output.startswith("3 images, "), limited.output
    assert read_task_folder(str(tmp_path / "few")).limit == 3
    again = CliRunner().invoke(app, ["manifest", str(path), str(tmp_path / "few"), "--no-progress"])
    assert again.exit_code == 2 and "already holds manifest parts" in again.output
    assert "manifest" in CliRunner().invoke(app, ["--help"]).output
    refused = CliRunner().invoke(app, ["manifest", str(tmp_path / "missing.json"), str(tmp_path / "o2")])
    assert refused.exit_code == 2 and "does not exist" in refused.output and "Traceback" not in refused.output


def test_the_reading_bar_ends_at_its_total_for_a_file_under_one_mib(tmp_path: Path) -> None:
    path = mixed_file(tmp_path / "coco.json")
    assert path.stat().st_size < 2**20
    result = CliRunner().invoke(app, ["manifest", str(path), str(tmp_path / "out"), "--progress"])
    assert result.exit_code == 0, result.output
    assert "manifest 1/1 MiB (100%)" in result.output, result.output


def box_only_file(path: Path, annotations: int, images: int) -> Path:
    with path.open("w") as handle:
        handle.write('{"images": [')
        handle.write(",".join(json.dumps(image(i, f"{i}.jpg", width=640, height=480)) for i in range(images)))
        handle.write('], "annotations": [')
        for position in range(annotations):
            handle.write(("," if position else "") + json.dumps(annotation(position, position % images)))
        handle.write("]}")
    return path


def peak_bytes(call) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_streaming_memory_does_not_grow_with_the_annotations(tmp_path: Path) -> None:
    path = box_only_file(tmp_path / "boxes.json", annotations=200_000, images=2_000)
    whole = peak_bytes(lambda: read_manifest(str(path)))
    stream = peak_bytes(lambda: stream_coco(str(path), str(tmp_path / "out")))
    assert stream < whole / 4 and stream < 96 * 2**20, (stream, whole)
