"""`hqsam review` and `hqsam apply` through the real command line on a refine output the test writes
itself (real Parquet parts, real RLE masks, real images), and the page builder's parts on their own:
the queue's order, the charts' counts, the crops, the image lookup, the decisions file."""

from __future__ import annotations

import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from hqsam.jobs.cli import app
from hqsam.pipeline.decisions import DecisionsError, parse_decisions, same_out
from hqsam.pipeline.review_crops import (
    CROP_MIN_PX,
    ORIGINAL_COLOUR,
    REFINED_COLOUR,
    Original,
    crop_window,
    image_candidates,
    outline,
    render_crops,
)
from hqsam.pipeline.review_page import (
    BINS,
    CATEGORY_CAP,
    OTHER,
    QUALITY_COLUMNS,
    category_groups,
    histograms,
    review_order,
)
from hqsam.schemas.refined import REFINED_ANNOTATION

GRAY = (90, 90, 90)
# image id -> file name, height, width; c.png is listed but never written.
IMAGES = {1: ("a.png", 160, 200), 2: ("b.png", 768, 1024), 3: ("c.png", 80, 80), 4: ("d.png", 80, 80)}
# annotation id -> image id, category id, refined rectangle, original rectangle (rows y0:y1, cols
# x0:x1) or None, input bbox (COCO xywh), stability, sam_hq_iou, the policy's verdict.
ANNOTATIONS = {
    11: (1, 1, (40, 100, 30, 120), (50, 90, 50, 100), [45, 45, 60, 50], 0.95, 0.9, True),
    12: (1, 1, (100, 150, 130, 190), (100, 150, 150, 190), [130, 100, 60, 50], 0.6, 0.95, False),
    13: (1, 2, (5, 30, 5, 60), None, [5, 5, 55, 25], 0.99, 0.4, True),
    21: (2, 1, (200, 600, 300, 700), (220, 600, 300, 700), [300, 200, 400, 400], 0.97, 0.98, True),
    31: (3, 2, (0, 50, 0, 40), (0, 50, 0, 50), [0, 0, 50, 50], 0.9, 0.9, None),
}
REJECTED_BY = "stability >= 0.8"
FAILED = 41  # an image_missing row on image 4: never shown
# rejected first (12), then by the lowest of stability, sam_hq_iou, iou_vs_original:
# 11 (iou 0.37), 13 (sam_hq_iou 0.4), 31 (iou 0.8), 21 (iou 0.95)
EXPECTED_ORDER = [12, 11, 13, 31, 21]


def rect(height: int, width: int, box) -> np.ndarray:
    y0, y1, x0, x1 = box
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode()}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def expected_ious() -> dict[int, float | None]:
    ious = {}
    for ann_id, (image_id, _, refined, original, *_) in ANNOTATIONS.items():
        _, h, w = IMAGES[image_id]
        ious[ann_id] = None if original is None else iou(rect(h, w, refined), rect(h, w, original))
    return ious


def make_run(root: Path, new_columns: bool = True) -> tuple[Path, Path, Path]:
    """root/data/{imgs/*.png, annotations.json} and root/out/rows/part-{0,1}.parquet; returns (out,
    annotations, imgs). Without `new_columns` the parts are those of an OUT written before the
    policy (no prompt, stability, sam_hq_iou, accepted, rejected_by)."""
    imgs = root / "data" / "imgs"
    imgs.mkdir(parents=True)
    for image_id, (name, h, w) in IMAGES.items():
        if image_id in (1, 2):
            Image.new("RGB", (w, h), GRAY).save(imgs / name)
    coco = {
        "images": [
            {"id": i, "file_name": f"imgs/{name}", "height": h, "width": w}
            for i, (name, h, w) in IMAGES.items()
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "blob"}],
    }
    rows = []
    ious = expected_ious()
    for ann_id, (
        image_id,
        category,
        refined,
        original,
        bbox,
        stability,
        agree,
        accepted,
    ) in ANNOTATIONS.items():
        name, h, w = IMAGES[image_id]
        annotation = {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": bbox, "iscrowd": 0}
        annotation["area"] = float(bbox[2] * bbox[3])
        if original is not None:
            annotation["segmentation"] = rle(rect(h, w, original))
        coco["annotations"].append(annotation)
        mask = rect(h, w, refined)
        y0, y1, x0, x1 = refined
        rows.append(
            {"image_id": image_id, "image_uri": str(imgs / name), "annotation_id": ann_id}
            | {"ann_index": len(coco["annotations"]) - 1, "category_id": category}
            | {"bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "area": int(mask.sum())}
            | {"segmentation": rle(mask), "score": 0.9, "iou_vs_original": ious[ann_id]}
            | {"boundary_iou_vs_original": None if ious[ann_id] is None else ious[ann_id] / 2}
            | {"prompt": "box", "stability": stability, "sam_hq_iou": agree, "accepted": accepted}
            | {"rejected_by": REJECTED_BY if accepted is False else None}
            | {"status": "ok", "error": None, "model": "vit_tiny"}
        )
    coco["annotations"].append({"id": FAILED, "image_id": 4, "category_id": 1, "bbox": [1, 1, 5, 5]})
    rows.append(
        {"image_id": 4, "image_uri": str(imgs / "d.png"), "annotation_id": FAILED}
        | {"ann_index": len(coco["annotations"]) - 1, "category_id": 1, "status": "image_missing"}
        | {"error": "image not found", "model": "vit_tiny"}
    )
    annotations = root / "data" / "annotations.json"
    annotations.write_text(json.dumps(coco))
    out = root / "out"
    (out / "rows").mkdir(parents=True)
    schema = REFINED_ANNOTATION
    if not new_columns:
        old = ("prompt", "stability", "sam_hq_iou", "accepted", "rejected_by")
        schema = pa.schema([field for field in schema if field.name not in old])
        rows = [{key: value for key, value in row.items() if key not in old} for row in rows]
    # Two part files, as a run with two batches writes them.
    pq.write_table(pa.Table.from_pylist(rows[:3], schema=schema), out / "rows" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:], schema=schema), out / "rows" / "part-1.parquet")
    (out / "summary.json").write_text("{}")
    return out, annotations, imgs


class Page(HTMLParser):
    """index.html: its embedded data, its charts (data attributes) and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: list[dict] = []
        self.text: list[str] = []
        self._script: str | None = None
        self.data: dict = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg" and "hist" in attrs.get("class", ""):
            self.charts.append({**attrs, "bars": []})
        elif tag == "rect" and attrs.get("class") == "bar":
            self.charts[-1]["bars"].append(int(attrs["data-n"]))
        elif tag == "script" and attrs.get("id") == "hqsam-data":
            self._script = ""

    def handle_endtag(self, tag):
        if tag == "script" and self._script is not None:
            self.data = json.loads(self._script)
            self._script = None

    def handle_data(self, data):
        if self._script is not None:
            self._script += data
        else:
            self.text.append(data)

    def ids(self, key: str = "queue") -> list[int]:
        return [row["annotation_id"] for row in self.data[key]]


def review(out: Path | str, to: Path | str, *extra: str):
    result = CliRunner().invoke(app, ["review", str(out), "--to", str(to), "--no-progress", *extra])
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    return result


def parse_page(to: Path) -> Page:
    page = Page()
    page.feed((to / "index.html").read_text())
    return page


def crop_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        return np.asarray(image).astype(int)


def near(pixel, colour, tolerance: int = 40) -> bool:
    """JPEG shifts colours a little: close to `colour` in every channel."""
    return all(abs(int(a) - b) <= tolerance for a, b in zip(pixel, colour))


def has_colour(pixels: np.ndarray, colour, tolerance: int = 40) -> bool:
    return bool((np.abs(pixels - np.array(colour)) <= tolerance).all(axis=-1).any())


# --- the command ---------------------------------------------------------------------------------


def test_review_with_originals(tmp_path: Path) -> None:
    out, annotations, _ = make_run(tmp_path)
    to = tmp_path / "review"
    result = review(out, to, "--annotations", str(annotations))
    assert result.output.strip().endswith(f"4 rows to review, 1 not shown -> {to}/index.html")
    page = parse_page(to)
    data = page.data
    assert data["out"] == str(out) and data["hqsam_review"] == 1
    # the queue in review order; 31's image is missing: listed as not shown, with a note
    assert page.ids() == [a for a in EXPECTED_ORDER if a != 31]
    assert page.ids("skipped") == [31] and "image not found" in data["skipped"][0]["note"]
    first = data["queue"][0]
    assert first["accepted"] is False and first["rejected_by"] == REJECTED_BY
    assert first["category"] == "thing (1)" and first["prompt"] == "box"
    assert first["values"]["stability"] == pytest.approx(0.6) and set(first["values"]) == set(QUALITY_COLUMNS)
    assert data["summary"]["policy"] == {"accepted": 3, "rejected": 1, "none": 1}
    assert data["summary"]["statuses"] == {"image_missing": 1, "ok": 5} and data["summary"]["originals"]
    # crops: every queued row has a refined crop; 13 has no original mask, so no original crop
    crops = {row["annotation_id"]: row["crops"] for row in data["queue"]}
    assert crops[13][0] is None and data["queue"][2]["note"] == "the input annotation has no mask"
    written = sorted(p.relative_to(to).as_posix() for p in (to / "crops").iterdir())
    assert written == sorted(c for pair in crops.values() for c in pair if c)
    # 11 on a 200x160 gray image: refined rows 40:100 x cols 30:120, original rows 50:90 x cols 50:100.
    # The crop is their union with a margin of 15% of 90 px (14 px): rows 26:114, cols 16:134,
    # drawn at 320/118 = 2.71x.
    scale = 320 / 118
    before, after = crop_pixels(to / crops[11][0]), crop_pixels(to / crops[11][1])
    assert before.shape == after.shape == (round(88 * scale), 320, 3)
    inside_original = (round((70 - 26) * scale), round((75 - 16) * scale))
    outside_both = (2, 2)
    refined_only = (round((45 - 26) * scale), round((40 - 16) * scale))
    assert near(before[inside_original], np.add(np.multiply(GRAY, 0.65), np.multiply(ORIGINAL_COLOUR, 0.35)))
    assert near(before[outside_both], GRAY) and near(before[refined_only], GRAY)
    assert near(after[refined_only], np.add(np.multiply(GRAY, 0.65), np.multiply(REFINED_COLOUR, 0.35)))
    assert near(after[round((40 - 26) * scale) + 1, 160], REFINED_COLOUR)  # the refined top border
    assert near(after[round((50 - 26) * scale), 160], ORIGINAL_COLOUR, 60)  # the original's outline over it
    assert not has_colour(crop_pixels(to / crops[13][1]), ORIGINAL_COLOUR, 30)


def test_charts_count_the_ok_rows_per_category(tmp_path: Path) -> None:
    out, annotations, _ = make_run(tmp_path)
    review(out, tmp_path / "review", "--annotations", str(annotations))
    page = parse_page(tmp_path / "review")
    groups = ["all", "thing (1)", "blob (2)"]  # thing has 11, 12, 21; blob 13, 31
    assert [(c["data-column"], c["data-group"]) for c in page.charts] == [
        (column, group) for column in QUALITY_COLUMNS for group in groups
    ]
    totals = {(c["data-column"], c["data-group"]): int(c["data-total"]) for c in page.charts}
    missing = {(c["data-column"], c["data-group"]): int(c["data-missing"]) for c in page.charts}
    for column in QUALITY_COLUMNS:
        assert [totals[column, g] for g in groups] == [5, 3, 2]
    assert missing["iou_vs_original", "blob (2)"] == 1 and missing["stability", "blob (2)"] == 0
    for chart in page.charts:
        assert sum(chart["bars"]) + int(chart["data-missing"]) == int(chart["data-total"])


def test_without_annotations_shows_refined_only(tmp_path: Path) -> None:
    out, _, _ = make_run(tmp_path)
    to = tmp_path / "review"
    review(out, to, "--n", "2")
    page = parse_page(to)
    assert page.ids() == EXPECTED_ORDER[:2]
    assert "No --annotations" in "".join(page.text) and not page.data["summary"]["originals"]
    assert all(row["crops"][0] is None for row in page.data["queue"])
    assert page.data["queue"][0]["category"] == "category 1"  # no names without the input
    assert not has_colour(crop_pixels(to / page.data["queue"][1]["crops"][1]), ORIGINAL_COLOUR, 30)


def test_the_run_record_names_the_input(tmp_path: Path) -> None:
    out, annotations, _ = make_run(tmp_path)
    (out / "_hqsam_run.json").write_text(json.dumps({"identity": {"annotations_uri": str(annotations)}}))
    review(out, tmp_path / "review")
    page = parse_page(tmp_path / "review")
    assert page.data["summary"]["originals"] and page.data["queue"][1]["crops"][0]


def test_moved_images(tmp_path: Path) -> None:
    out, annotations, imgs = make_run(tmp_path)
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(str(imgs), moved / "imgs")

    review(out, tmp_path / "stale", "--annotations", str(annotations))
    page = parse_page(tmp_path / "stale")
    assert page.ids() == [] and page.ids("skipped") == EXPECTED_ORDER

    for extra in ([], ["--annotations", str(annotations)]):  # suffix rule, then ROOT/file_name
        to = tmp_path / f"moved{len(extra)}"
        review(out, to, "--images", str(moved), *extra)
        page = parse_page(to)
        assert page.ids() == [a for a in EXPECTED_ORDER if a != 31] and page.ids("skipped") == [31]


def test_an_out_written_before_the_policy(tmp_path: Path) -> None:
    """Parts without prompt, stability, sam_hq_iou, accepted, rejected_by: read as nulls, ordered by
    iou_vs_original alone, no verdicts; apply takes every ok row."""
    out, annotations, _ = make_run(tmp_path, new_columns=False)
    review(out, tmp_path / "review", "--annotations", str(annotations))
    page = parse_page(tmp_path / "review")
    assert page.ids() == [11, 12, 21, 13] and page.ids("skipped") == [31]  # 13 has no iou: last
    assert page.data["summary"]["policy"] == {"accepted": 0, "rejected": 0, "none": 5}
    assert all(row["accepted"] is None for row in page.data["queue"])
    decisions = write_decisions(tmp_path / "d.json", str(out), [])
    written = apply(out, decisions, "--annotations", str(annotations))
    assert [a["hqsam"]["accepted"] for a in written["annotations"]] == [True] * 5 + [False]


def test_empty_out_exits_2(tmp_path: Path) -> None:
    empty = tmp_path / "out"
    empty.mkdir()
    (empty / "summary.json").write_text("{}")
    for out in (empty, tmp_path / "absent"):
        result = CliRunner().invoke(app, ["review", str(out), "--to", str(tmp_path / "p")])
        assert result.exit_code == 2, (result.output, result.exception)
        message = result.stderr.strip()
        assert message.startswith("error: ") and "\n" not in message and "part-" in message
    assert not (tmp_path / "p" / "index.html").exists()


def test_unusable_annotations_exit_2(tmp_path: Path) -> None:
    out, _, _ = make_run(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    for unusable in (bad, tmp_path / "absent.json"):
        result = CliRunner().invoke(
            app, ["review", str(out), "--to", str(tmp_path / "p"), "--annotations", str(unusable)]
        )
        assert result.exit_code == 2, (result.output, result.exception)
        message = result.stderr.strip()
        assert message.startswith("error: ") and "\n" not in message and unusable.name in message
    assert not (tmp_path / "p" / "index.html").exists()


def test_review_to_s3(tmp_path: Path, s3_bucket: str) -> None:
    import s3fs

    out, annotations, _ = make_run(tmp_path)
    to = f"s3://{s3_bucket}/review"
    result = review(out, to, "--annotations", str(annotations), "--n", "2")
    assert f"-> {to}/index.html" in result.output
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/review")) == ["crops", "index.html"]
    page = Page()
    page.feed(fs.cat(f"{s3_bucket}/review/index.html").decode())
    assert page.ids() == EXPECTED_ORDER[:2]
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/review/crops"))
    assert names == sorted(c.split("/")[1] for row in page.data["queue"] for c in row["crops"] if c)


def test_rows_are_matched_to_their_own_annotation_when_ids_repeat(tmp_path: Path) -> None:
    """Three annotations with id 7, two on one image and one on another: each row shows its own
    refined mask and its own original (matched by position in the input, `ann_index`)."""
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (200, 160), GRAY).save(tmp_path / "imgs" / name)
    # position -> image id, refined rectangle, original rectangle (y0, y1, x0, x1)
    shapes = {
        0: (1, (40, 100, 30, 120), (50, 90, 50, 100)),
        1: (2, (20, 80, 20, 100), (30, 70, 40, 90)),
        2: (1, (100, 150, 130, 190), (110, 140, 140, 180)),
    }
    coco = {
        "images": [
            {"id": i, "file_name": f"imgs/{n}", "height": 160, "width": 200}
            for i, n in ((1, "a.png"), (2, "b.png"))
        ],
        "annotations": [
            {"id": 7, "image_id": image_id, "category_id": 1, "segmentation": rle(rect(160, 200, original))}
            for image_id, _, original in shapes.values()
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    rows = [
        {"image_id": image_id, "image_uri": str(tmp_path / "imgs" / ("a.png" if image_id == 1 else "b.png"))}
        | {"annotation_id": 7, "ann_index": position, "category_id": 1}
        | {"segmentation": rle(rect(160, 200, refined)), "status": "ok", "model": "vit_tiny"}
        | {"iou_vs_original": iou(rect(160, 200, refined), rect(160, 200, original))}
        for position, (image_id, refined, original) in shapes.items()
    ]
    out = tmp_path / "out"
    (out / "rows").mkdir(parents=True)
    for position, row in enumerate(rows):  # one part per row: the rows of one id in different files
        table = pa.Table.from_pylist([row], schema=REFINED_ANNOTATION)
        pq.write_table(table, out / "rows" / f"part-{position}.parquet")

    to = tmp_path / "review"
    review(out, to, "--annotations", str(tmp_path / "coco.json"))
    for row in parse_page(to).data["queue"]:
        _, refined, original = shapes[row["ann_index"]]
        assert row["values"]["iou_vs_original"] == pytest.approx(
            rows[row["ann_index"]]["iou_vs_original"], abs=1e-4
        )
        # the original's own crop holds its own mask: render it again from the known masks, compare
        expected, _ = render_crops(
            np.full((160, 200, 3), GRAY, np.uint8), rect(160, 200, refined), rect(160, 200, original)
        )
        drawn = crop_pixels(to / row["crops"][0])
        assert drawn.shape == expected.shape and np.abs(drawn - expected).mean() < 3, row["ann_index"]


# --- apply ---------------------------------------------------------------------------------------


def write_decisions(path: Path, out: str, decided: list[tuple[int, int, str]], **extra) -> Path:
    """A decisions file as the page exports it: (ann_index, annotation_id, decision) per entry."""
    entries = [{"ann_index": p, "annotation_id": a, "decision": d} for p, a, d in decided]
    path.write_text(json.dumps({"hqsam_decisions": 1, "out": out, "decisions": entries} | extra))
    return path


def apply(out: Path, decisions: Path, *extra: str) -> dict:
    result = CliRunner().invoke(app, ["apply", str(out), "--decisions", str(decisions), *extra])
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    target = Path(extra[extra.index("--to") + 1]) if "--to" in extra else out / "annotations.json"
    assert result.output.strip().endswith(f"-> {target}")
    return json.loads(target.read_text())


def test_apply_takes_the_persons_decisions_over_the_policy(tmp_path: Path) -> None:
    out, annotations, _ = make_run(tmp_path)
    coco = json.loads(annotations.read_text())
    rows = {row["annotation_id"]: row for row in pq.read_table(out / "rows").to_pylist()}
    position = {a["id"]: p for p, a in enumerate(coco["annotations"])}
    # 12: rejected by the policy, accepted by a person; 21: accepted by the policy, rejected by one
    decisions = write_decisions(
        tmp_path / "decisions.json", str(out), [(position[12], 12, "accept"), (position[21], 21, "reject")]
    )
    result = CliRunner().invoke(
        app, ["apply", str(out), "--decisions", str(decisions), "--annotations", str(annotations)]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert (
        "4 refined masks taken (1 by you, 3 by the policy), 2 originals kept (1 by you, 0 by the policy, "
        "1 not refined)" in (result.output)
    )
    written = {a["id"]: a for a in json.loads((out / "annotations.json").read_text())["annotations"]}
    for ann_id, accepted, decided_by in (
        (11, True, "policy"),
        (12, True, "person"),
        (13, True, "policy"),
        (21, False, "person"),
        (31, True, "policy"),  # no verdict: an ok row is taken
        (FAILED, False, "policy"),
    ):
        annotation, original = written[ann_id], coco["annotations"][position[ann_id]]
        assert annotation["hqsam"]["accepted"] is accepted and annotation["hqsam"]["decided_by"] == decided_by
        if accepted:
            assert annotation["segmentation"] == rows[ann_id]["segmentation"]
            assert annotation["bbox"] == rows[ann_id]["bbox"] and annotation["area"] == rows[ann_id]["area"]
        else:  # the original, as it was
            assert {k: v for k, v in annotation.items() if k != "hqsam"} == original
    # another target
    other = apply(out, decisions, "--annotations", str(annotations), "--to", str(tmp_path / "final.json"))
    assert other["annotations"] == list(written.values())


def test_apply_refuses_what_it_cannot_apply(tmp_path: Path) -> None:
    out, annotations, _ = make_run(tmp_path)
    failed = len(ANNOTATIONS)  # the position of the image_missing row
    cases = {
        "another OUT": write_decisions(tmp_path / "1.json", str(tmp_path / "other"), []),
        "not JSON": tmp_path / "2.json",
        "not a decisions file": tmp_path / "3.json",
        "a bad entry": write_decisions(tmp_path / "4.json", str(out), [(0, 11, "maybe")]),
        "a row OUT has not": write_decisions(tmp_path / "5.json", str(out), [(99, 11, "accept")]),
        "another id there": write_decisions(tmp_path / "6.json", str(out), [(0, 12, "accept")]),
        "a failed row": write_decisions(tmp_path / "7.json", str(out), [(failed, FAILED, "accept")]),
        "twice": write_decisions(tmp_path / "8.json", str(out), [(0, 11, "accept"), (0, 11, "reject")]),
        "absent": tmp_path / "absent.json",
    }
    (tmp_path / "2.json").write_text("{ nope")
    (tmp_path / "3.json").write_text(json.dumps({"decisions": []}))
    expected = {
        "another OUT": "holds decisions for",
        "not JSON": "is not JSON",
        "not a decisions file": "is not a decisions file",
        "a bad entry": "decision #0 of",
        "a row OUT has not": "decides annotation #99, which",
        "another id there": "made for another OUT",
        "a failed row": "image_missing, not ok",
        "twice": "decides annotation #0 twice",
        "absent": "does not exist",
    }
    for case, path in cases.items():
        result = CliRunner().invoke(
            app, ["apply", str(out), "--decisions", str(path), "--annotations", str(annotations)]
        )
        assert result.exit_code == 2, (case, result.output, result.exception)
        message = result.stderr.strip()
        assert message.startswith("error: ") and "\n" not in message and expected[case] in message, case
    no_input = write_decisions(tmp_path / "9.json", str(out), [])
    result = CliRunner().invoke(app, ["apply", str(out), "--decisions", str(no_input)])
    assert result.exit_code == 2 and "--annotations" in result.stderr
    assert not (out / "annotations.json").exists()


def test_parse_decisions() -> None:
    document = {"hqsam_decisions": 1, "out": "s3://b/out/", "decisions": []}
    document["decisions"] = [
        {"ann_index": 3, "annotation_id": 30, "decision": "accept"},
        {"ann_index": 1, "annotation_id": 10, "decision": "reject"},
    ]
    parsed = parse_decisions(json.dumps(document).encode(), "s3://b/out")
    assert {p: (d.annotation_id, d.accept) for p, d in parsed.items()} == {3: (30, True), 1: (10, False)}
    for bad in ({"ann_index": True, "annotation_id": 1, "decision": "accept"}, {"ann_index": 1.0}, "x"):
        with pytest.raises(DecisionsError, match=r"decision #0 of f is not"):
            parse_decisions(json.dumps(document | {"decisions": [bad]}).encode(), "s3://b/out", "f")
    with pytest.raises(DecisionsError, match="not for 's3://b/other'"):
        parse_decisions(json.dumps(document).encode(), "s3://b/other")
    with pytest.raises(DecisionsError, match='no "decisions" list'):
        parse_decisions(json.dumps(document | {"decisions": {}}).encode(), "s3://b/out")
    with pytest.raises(DecisionsError, match='"hqsam_decisions": 1'):
        parse_decisions(json.dumps(document | {"hqsam_decisions": 2}).encode(), "s3://b/out")
    assert same_out("out", str(Path("out").resolve()) + "/") and not same_out("out", "out2")


# --- the page builder on its own -----------------------------------------------------------------


def quality_table(rows: list[dict]) -> pa.Table:
    columns = ["ann_index", "category_id", "accepted", *QUALITY_COLUMNS]
    return pa.Table.from_pylist(
        [{column: row.get(column) for column in columns} for row in rows],
        schema=pa.schema([REFINED_ANNOTATION.field(column) for column in columns]),
    )


def test_review_order() -> None:
    rows = [
        {"ann_index": 0, "stability": 0.9, "sam_hq_iou": 0.9, "iou_vs_original": 0.9, "accepted": True},
        {"ann_index": 1, "stability": 0.95, "sam_hq_iou": None, "iou_vs_original": 0.5, "accepted": True},
        {"ann_index": 2, "stability": 0.99, "accepted": False},  # rejected: first, whatever its values
        {"ann_index": 3, "stability": 0.2, "sam_hq_iou": 0.9, "accepted": False},
        {"ann_index": 4, "accepted": True},  # nothing to order by: last
        {"ann_index": 5, "stability": float("nan"), "sam_hq_iou": 0.7, "accepted": None},  # NaN ignored
        {"ann_index": 6, "stability": 0.9, "sam_hq_iou": 0.9, "iou_vs_original": 0.9, "score": 0.0},
    ]
    table = quality_table(rows)
    assert [rows[k]["ann_index"] for k in review_order(table)] == [3, 2, 1, 5, 0, 6, 4]
    assert review_order(table.slice(0, 0)).tolist() == []


def test_histograms_count_per_category_with_others_grouped() -> None:
    rng = np.random.default_rng(0)
    categories = CATEGORY_CAP + 3
    rows = []
    for k in range(400):
        category = int(rng.integers(categories)) if k % 50 else None
        value = float(rng.random()) * 1.2 - 0.1 if k % 7 else None  # a few outside [0, 1], some missing
        rows.append({"ann_index": k, "category_id": category, "accepted": bool(k % 3), "stability": value})
    table = quality_table(rows)
    charts = histograms(table, {0: "zero"})
    groups = [chart.group for chart in charts if chart.column == "stability"]
    assert len(charts) == len(QUALITY_COLUMNS) * len(groups)
    assert groups[0] == "all" and groups[-1] == OTHER and len(groups) == 1 + CATEGORY_CAP + 1
    counts = {}
    for row in rows:
        category = row["category_id"]
        counts[category] = counts.get(category, 0) + 1
    by_size = sorted((c for c in counts if c is not None), key=lambda c: (-counts[c], c))
    shown = by_size[:CATEGORY_CAP]
    assert groups[1:-1] == [("zero (0)" if c == 0 else f"category {c}") for c in shown]
    stability = {chart.group: chart for chart in charts if chart.column == "stability"}
    assert stability["all"].total == 400
    other_rows = [r for r in rows if r["category_id"] not in shown]
    assert stability[OTHER].total == len(other_rows)
    assert stability[OTHER].missing == sum(r["stability"] is None for r in other_rows)
    values = [r["stability"] for r in rows if r["stability"] is not None]
    expected = np.bincount(
        np.clip(np.floor(np.array(values) * BINS), 0, BINS - 1).astype(int), minlength=BINS
    )
    assert stability["all"].counts == expected.tolist()
    bad = [r["stability"] for r in rows if r["stability"] is not None and r["accepted"] is False]
    assert sum(stability["all"].rejected) == len(bad)
    assert all(chart.missing == chart.total for chart in charts if chart.column == "score")


def test_category_groups_show_all_when_only_one_would_be_other() -> None:
    ids = np.repeat(np.arange(CATEGORY_CAP + 1), 2)
    _, order = category_groups(ids, {})
    assert len(order) == CATEGORY_CAP + 1 and OTHER not in order
    _, order = category_groups(np.array([1, 1, 2, -1]), {})
    assert order == ["category 1", "category 2", OTHER]


def test_the_page_embeds_its_data_safely(tmp_path: Path) -> None:
    out, annotations, _ = make_run(tmp_path)
    coco = json.loads(annotations.read_text())
    coco["categories"][0]["name"] = "</script><b>x</b>"
    annotations.write_text(json.dumps(coco))
    review(out, tmp_path / "review", "--annotations", str(annotations))
    text = (tmp_path / "review" / "index.html").read_text()
    assert "</script><b>" not in text and not re.search(r"(src|href)=\"?(https?:)?//", text)
    assert parse_page(tmp_path / "review").data["queue"][0]["category"] == "</script><b>x</b> (1)"


def test_outline_is_the_inner_border() -> None:
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    ring = mask.copy()
    ring[2:5, 2:5] = False
    assert (outline(mask, 1) == ring).all()
    inner = mask.copy()
    inner[3, 3] = False  # two erosions leave only the centre
    assert (outline(mask, 2) == inner).all()
    assert outline(np.ones((4, 4), bool), 1).sum() == 12  # the image edge counts as a border


def test_crop_window() -> None:
    a, b = rect(100, 200, (40, 60, 50, 90)), rect(100, 200, (45, 70, 60, 120))
    # union rows 40:70, cols 50:120; margin max(8, 15% of 70) = 10
    assert crop_window([a, b], 100, 200) == (30, 80, 40, 130)
    tiny = rect(100, 200, (0, 2, 198, 200))  # in a corner: grown to CROP_MIN_PX inside the image
    y0, y1, x0, x1 = crop_window([tiny], 100, 200)
    assert (y0, x1) == (0, 200) and y1 - y0 == CROP_MIN_PX and x1 - x0 == CROP_MIN_PX
    assert crop_window([np.zeros((10, 20), bool)], 10, 20) == (0, 10, 0, 20)


def test_render_crops_draws_each_mask_on_its_own_panel() -> None:
    image = np.full((100, 120, 3), GRAY, np.uint8)
    refined, original = rect(100, 120, (20, 80, 20, 100)), rect(100, 120, (30, 70, 40, 90))
    before, after = render_crops(image, refined, original)
    # crop rows 8:92, cols 8:112 (margin 12), drawn at 320/104
    assert before.shape == after.shape == (round(84 * 320 / 104), 320, 3)
    at = lambda y, x: (round((y - 8) * 320 / 104), round((x - 8) * 320 / 104))  # noqa: E731
    fill = lambda colour: tuple(round(g * 0.65 + c * 0.35) for g, c in zip(GRAY, colour))  # noqa: E731
    assert tuple(before[at(50, 60)]) == fill(ORIGINAL_COLOUR) and tuple(before[at(25, 30)]) == GRAY
    assert tuple(after[at(50, 60)]) == fill(REFINED_COLOUR) and tuple(after[at(25, 30)]) == fill(
        REFINED_COLOUR
    )
    assert tuple(after[at(20, 60)]) == REFINED_COLOUR  # the refined top border
    assert tuple(after[at(30, 60)]) == ORIGINAL_COLOUR  # the original's outline over it
    assert tuple(before[at(10, 10)]) == tuple(after[at(10, 10)]) == GRAY
    none, alone = render_crops(image, refined, None)
    assert none is None and not (alone == ORIGINAL_COLOUR).all(axis=-1).any()
    with pytest.raises(ValueError, match="image is 120x100 but the refined mask is 130x100"):
        render_crops(image, rect(100, 130, (1, 2, 1, 2)), None)


def test_image_candidates() -> None:
    uri = "s3://bucket/runs/data/imgs/a.png"
    assert image_candidates(uri, None, None) == [uri]
    moved = Original("", [], "/moved/imgs/a.png")
    assert image_candidates(uri, "/moved", moved) == ["/moved/imgs/a.png"]
    assert image_candidates(uri, "/moved", None) == [
        "/moved/runs/data/imgs/a.png",
        "/moved/data/imgs/a.png",
        "/moved/imgs/a.png",
        "/moved/a.png",
    ]
    assert image_candidates("/x/a.png", "gs://root", None) == ["gs://root/x/a.png", "gs://root/a.png"]


def test_unreadable_images_are_noted(tmp_path: Path) -> None:
    out, annotations, imgs = make_run(tmp_path)
    (imgs / "a.png").write_bytes(b"not an image")
    review(out, tmp_path / "review", "--annotations", str(annotations))
    page = parse_page(tmp_path / "review")
    assert page.ids() == [21] and sorted(page.ids("skipped")) == [11, 12, 13, 31]
    notes = {row["annotation_id"]: row["note"] for row in page.data["skipped"]}
    assert "a.png" in notes[11] and "decodable" in notes[11] and "image not found" in notes[31]


def test_jpeg_is_written_whole(tmp_path: Path) -> None:
    out, annotations, _ = make_run(tmp_path)
    review(out, tmp_path / "review", "--annotations", str(annotations), "--n", "1")
    for name in parse_page(tmp_path / "review").data["queue"][0]["crops"]:
        with Image.open(io.BytesIO((tmp_path / "review" / name).read_bytes())) as image:
            image.load()


def test_an_out_without_ok_rows_gives_an_empty_queue(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "rows").mkdir(parents=True)
    row = {"image_id": 1, "annotation_id": 1, "ann_index": 0, "status": "image_missing", "model": "vit_tiny"}
    pq.write_table(pa.Table.from_pylist([row], schema=REFINED_ANNOTATION), out / "rows" / "part-0.parquet")
    result = review(out, tmp_path / "review")
    assert result.output.strip().endswith(
        "0 rows to review, 0 not shown -> " + str(tmp_path / "review/index.html")
    )
    page = parse_page(tmp_path / "review")
    assert page.data["queue"] == [] and page.charts == [] and page.data["summary"]["ok"] == 0
