"""What OUT holds of a run's task rows, counted off the driver (pipeline/out_tally.py), and the source
that reads a task folder without the rows already written (pipeline/task_source.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hqsam.pipeline.out_tally import OutTally, count_out
from hqsam.pipeline.task_source import drop_written, is_marked
from hqsam.pipeline.write_parquet import write_atomically
from hqsam.schemas.refined import REFINED_ANNOTATION

# Two parts; image 7 is split into two task rows (positions 0-1 and 2), image 9 repeats in part 2.
PARTS = [
    {"image_id": [7, 7, 8], "ann_indices": [[0, 1], [2], [3, 4, 5]]},
    {"image_id": [9, 9], "ann_indices": [[6], [7, 8]]},
]


def write_parts(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for number, part in enumerate(PARTS):
        uri = folder / f"part-{number:05d}.parquet"
        pq.write_table(pa.table({"image_id": pa.array(part["image_id"], pa.int64()), **part}), uri)
        uris.append(str(uri))
    return uris


def write_rows(out: Path, name: str, rows: list[tuple[int, str]]) -> None:
    table = pa.Table.from_pylist(
        [
            {"image_id": 0, "annotation_id": 0, "ann_index": at, "status": status, "model": "m"}
            for at, status in rows
        ],
        schema=REFINED_ANNOTATION,
    )
    write_atomically(str(out / "rows" / name), table)


def test_an_empty_out_has_every_task_row_unwritten(tmp_path: Path) -> None:
    tally, written = count_out(write_parts(tmp_path / "tasks"), str(tmp_path / "out"), 9)
    assert tally == OutTally(unwritten_rows=5, unwritten_annotations=9, unwritten_images=3)
    assert not is_marked(written, np.arange(9)).any()


def test_statuses_repeats_and_unwritten_rows_are_counted_from_out(tmp_path: Path) -> None:
    parts = write_parts(tmp_path / "tasks")
    out = tmp_path / "out"
    write_rows(out, "part-a.parquet", [(0, "ok"), (1, "image_missing"), (6, "ok")])
    # position 6 again (a part copied in twice), and rows of annotations that are not the run's
    write_rows(out, "part-b.parquet", [(6, "inference_failed"), (6, "ok"), (42, "ok"), (-1, "ok")])
    tally, written = count_out(parts, str(out), 9)
    assert tally.written == 3 and tally.repeated == 2
    assert tally.statuses == {"image_missing": 1, "ok": 2}  # the first row of each annotation
    # unwritten: task rows [2] (image 7), [3, 4, 5] (image 8) and [7, 8] (image 9)
    assert (tally.unwritten_rows, tally.unwritten_annotations, tally.unwritten_images) == (3, 6, 3)
    assert is_marked(written, np.arange(12)).tolist() == [p in (0, 1, 6) for p in range(12)]


def test_verdicts_are_counted_once_per_annotation_and_old_parts_count_in_neither(tmp_path: Path) -> None:
    parts = write_parts(tmp_path / "tasks")
    out = tmp_path / "out"
    judged = [
        # ann_index, status, category_id, accepted, rejected_by
        (0, "ok", 1, True, None),
        (1, "ok", 1, False, "stability >= 0.9"),
        (2, "ok", 2, False, "iou_vs_original >= 0.5"),
        (3, "ok", 2, False, "stability >= 0.9"),
        (4, "invalid_box", 2, None, None),
        (3, "ok", 2, True, None),  # a second row of position 3: only its first row counts
    ]
    table = pa.Table.from_pylist(
        [
            {"image_id": 0, "annotation_id": 0, "ann_index": at, "status": status, "model": "m"}
            | {"category_id": category, "accepted": accepted, "rejected_by": clause}
            for at, status, category, accepted, clause in judged
        ],
        schema=REFINED_ANNOTATION,
    )
    write_atomically(str(out / "rows" / "part-a.parquet"), table)
    # a part written before the policy existed: no verdict columns at all
    old = pa.table({"ann_index": pa.array([5, 6], pa.int64()), "status": ["ok", "ok"]})
    pq.write_table(old, out / "rows" / "part-b.parquet")
    tally, _ = count_out(parts, str(out), 9)
    assert (tally.accepted, tally.rejected) == (1, 3) and tally.written == 7
    assert tally.rejected_by_clause == {"stability >= 0.9": 2, "iou_vs_original >= 0.5": 1}
    assert tally.by_category == {"1": {"accepted": 1, "rejected": 1}, "2": {"accepted": 0, "rejected": 2}}


def test_the_source_filter_drops_the_rows_whose_first_annotation_is_written(tmp_path: Path) -> None:
    parts = write_parts(tmp_path / "tasks")
    out = tmp_path / "out"
    write_rows(out, "part-a.parquet", [(0, "ok"), (1, "ok"), (6, "ok")])
    _, written = count_out(parts, str(out), 9)
    kept = [drop_written(pq.read_table(part), written) for part in parts]
    assert [table["ann_indices"].to_pylist() for table in kept] == [[[2], [3, 4, 5]], [[7, 8]]]


def test_is_marked_reads_little_endian_packed_bits() -> None:
    rng = np.random.default_rng(0)
    flags = rng.random(1000) < 0.3
    positions = rng.integers(0, 1200, 500)  # some beyond the marks: not marked
    bits = np.packbits(flags, bitorder="little")
    expected = [bool(p < 1000 and flags[p]) for p in positions]
    assert is_marked(bits, positions).tolist() == expected


def test_the_task_dataset_reads_one_block_per_part_in_order(ray_session, tmp_path: Path) -> None:
    from hqsam.pipeline.stream_coco import StreamedManifest
    from hqsam.pipeline.task_source import task_dataset
    from hqsam.schemas.refine_rows import IMAGE_TASK

    folder = tmp_path / "tasks"
    folder.mkdir()
    uris = []
    for number, part in enumerate(PARTS):
        rows = [
            {"image_id": image_id, "ann_indices": positions, "ann_ids": positions}
            for image_id, positions in zip(part["image_id"], part["ann_indices"])
        ]
        uri = folder / f"part-{number:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=IMAGE_TASK), uri)
        uris.append(str(uri))
    tasks = StreamedManifest(parts=uris, images=3, annotations=9, rows=5, positions=9)
    dataset = task_dataset(tasks).materialize()
    assert dataset.num_blocks() == 2
    assert [list(row["ann_indices"]) for row in dataset.iter_rows()] == [
        positions for part in PARTS for positions in part["ann_indices"]
    ]
    out = tmp_path / "out"
    write_rows(out, "part-a.parquet", [(3, "ok"), (7, "ok")])
    _, written = count_out(uris, str(out), 9)
    remaining = task_dataset(tasks, ray_session.put(written))
    assert sorted(row["image_id"] for row in remaining.iter_rows()) == [7, 7, 9]
