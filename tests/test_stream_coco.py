"""The streaming COCO reader (pipeline/stream_coco.py, `hqsam manifest`) writes exactly the task
rows of read_manifest, in its order, refuses what it refuses in the same words, and holds far less
memory on a large file."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hqsam.jobs.cli import app
from hqsam.pipeline import stream_coco as streaming
from hqsam.pipeline.manifest import MAX_ANNOTATIONS_PER_ROW, ManifestError, read_manifest
from hqsam.pipeline.stream_coco import stream_coco
from hqsam.schemas.refine_rows import IMAGE_TASK
from tests.conftest import ROOT, SHARED_FIXTURES, shared_fixture
from tests.test_manifest_inputs import COCO_REFUSALS, annotation, coco_file, image


def streamed(path: str, out: str, images_root: str | None = None) -> pa.Table:
    result = stream_coco(path, out, images_root=images_root)
    parts = sorted(result.parts)
    assert parts == result.parts
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
    monkeypatch.setattr(streaming, "CHUNK", 97)  # many chunks...
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
    refused = CliRunner().invoke(app, ["manifest", str(tmp_path / "missing.json"), str(tmp_path / "o2")])
    assert refused.exit_code == 2 and "does not exist" in refused.output and "Traceback" not in refused.output


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
