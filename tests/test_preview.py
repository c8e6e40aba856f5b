"""`hqsam preview` through the real command line on a refine output the test writes itself, and its
row selection, image lookup and panel rendering on their own."""

from __future__ import annotations

import io
import json
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
from hqsam.pipeline.render_preview import (
    BOX_COLOUR,
    ORIGINAL_COLOUR,
    REFINED_COLOUR,
    Original,
    image_candidates,
    outline,
    render_panel,
    select_rows,
    write_panels,
)
from hqsam.schemas.refined import REFINED_ANNOTATION

GRAY = (90, 90, 90)
# image file name -> (height, width); c.png is listed but never written.
IMAGES = {1: ("a.png", 160, 200), 2: ("b.png", 768, 1024), 3: ("c.png", 80, 80), 4: ("d.png", 80, 80)}
# annotation id -> image id, refined rectangle, original rectangle (rows y0:y1, cols x0:x1) or None,
# input bbox (COCO xywh).
ANNOTATIONS = {
    11: (1, (40, 100, 30, 120), (50, 90, 50, 100), [45, 45, 60, 50]),
    12: (1, (100, 150, 130, 190), (100, 150, 150, 190), [130, 100, 60, 50]),
    13: (1, (5, 30, 5, 60), None, [5, 5, 55, 25]),
    21: (2, (200, 600, 300, 700), (220, 600, 300, 700), [300, 200, 400, 400]),
    31: (3, (0, 50, 0, 40), (0, 50, 0, 50), [0, 0, 50, 50]),
}
FAILED = 41  # an image_missing row on image 4: never shown


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
    for ann_id, (image_id, refined, original, _) in ANNOTATIONS.items():
        _, h, w = IMAGES[image_id]
        ious[ann_id] = None if original is None else iou(rect(h, w, refined), rect(h, w, original))
    return ious


def make_run(root: Path) -> tuple[Path, Path, Path]:
    """root/data/{imgs/*.png, annotations.json} and root/out/rows/part-{0,1}.parquet; returns (out, annotations, imgs)."""
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
        "categories": [{"id": 1, "name": "thing"}],
    }
    rows = []
    ious = expected_ious()
    for ann_id, (image_id, refined, original, bbox) in ANNOTATIONS.items():
        name, h, w = IMAGES[image_id]
        annotation = {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": bbox, "iscrowd": 0}
        if original is not None:
            annotation["segmentation"] = rle(rect(h, w, original))
        coco["annotations"].append(annotation)
        mask = rect(h, w, refined)
        y0, y1, x0, x1 = refined
        rows.append(
            {
                "image_id": image_id,
                "image_uri": str(imgs / name),
                "annotation_id": ann_id,
                "ann_index": len(coco["annotations"]) - 1,
                "category_id": 1,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": int(mask.sum()),
                "segmentation": rle(mask),
                "score": 0.9,
                "iou_vs_original": ious[ann_id],
                "boundary_iou_vs_original": None if ious[ann_id] is None else ious[ann_id] / 2,
                "status": "ok",
                "error": None,
                "model": "vit_tiny",
            }
        )
    coco["annotations"].append({"id": FAILED, "image_id": 4, "category_id": 1, "bbox": [1, 1, 5, 5]})
    rows.append(
        {
            "image_id": 4,
            "image_uri": str(imgs / "d.png"),
            "annotation_id": FAILED,
            "ann_index": len(coco["annotations"]) - 1,
            "category_id": 1,
            "bbox": None,
            "area": None,
            "segmentation": None,
            "score": None,
            "iou_vs_original": None,
            "boundary_iou_vs_original": None,
            "status": "image_missing",
            "error": "image not found",
            "model": "vit_tiny",
        }
    )
    annotations = root / "data" / "annotations.json"
    annotations.write_text(json.dumps(coco))
    out = root / "out"
    (out / "rows").mkdir(parents=True)
    # Two part files, as a run with two batches writes them.
    pq.write_table(pa.Table.from_pylist(rows[:3], schema=REFINED_ANNOTATION), out / "rows" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:], schema=REFINED_ANNOTATION), out / "rows" / "part-1.parquet")
    (out / "summary.json").write_text("{}")
    return out, annotations, imgs


class IndexParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.figures: list[dict] = []  # data-annotation-id, data-iou, img src in page order
        self.skipped: list[int] = []
        self.text: list[str] = []
        self._in_skipped = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            iou_text = attrs["data-iou"]
            self.figures.append(
                {"id": int(attrs["data-annotation-id"]), "iou": float(iou_text) if iou_text else None}
            )
        elif tag == "img":
            self.figures[-1]["src"] = attrs["src"]
        elif tag == "li" and attrs.get("class") == "skipped":
            self.skipped.append(int(attrs["data-annotation-id"]))
            self._in_skipped = True

    def handle_endtag(self, tag):
        if tag == "li":
            self._in_skipped = False

    def handle_data(self, data):
        self.text.append(("SKIPPED:" if self._in_skipped else "") + data)


def preview(out: Path, to: Path | str, *extra: str):
    result = CliRunner().invoke(app, ["preview", str(out), "--to", str(to), *extra])
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    return result


def parse_index(to: Path) -> IndexParser:
    parser = IndexParser()
    parser.feed((to / "index.html").read_text())
    return parser


def panel_pixels(path: Path, height: int, width: int) -> np.ndarray:
    """The image part of a panel (the caption strip lies below it)."""
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.width >= width and image.height > height
        return np.asarray(image)[:height, :width]


def colour_at(pixels: np.ndarray, y: int, x: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in pixels[y, x])


def test_preview_with_originals(tmp_path: Path) -> None:
    out, annotations, _ = make_run(tmp_path)
    to = tmp_path / "preview"
    preview(out, to, "--annotations", str(annotations))

    ious = expected_ious()
    readable = [a for a in ANNOTATIONS if ANNOTATIONS[a][0] != 3]  # image 3 has no file
    expected_order = sorted(
        readable, key=lambda a: (ious[a] is None, ious[a] if ious[a] is not None else 0.0)
    )
    assert expected_order[-1] == 13  # the one without an original goes last
    page = parse_index(to)
    assert [f["id"] for f in page.figures] == expected_order
    shown = [f["iou"] for f in page.figures if f["iou"] is not None]
    assert shown == sorted(shown) and len(shown) == len(expected_order) - 1
    assert [f["src"] for f in page.figures] == [f"panel_{a}.png" for a in expected_order]
    assert page.skipped == [31]
    skipped_text = "".join(t[8:] for t in page.text if t.startswith("SKIPPED:"))
    assert "c.png" in skipped_text and "not found" in skipped_text
    assert sorted(p.name for p in to.glob("*.png")) == sorted(f"panel_{a}.png" for a in expected_order)

    # annotation 11 on a 200x160 image (drawn 1:1): refined rows 40:100 x cols 30:120,
    # original rows 50:90 x cols 50:100, input box x 45..105, y 45..95.
    pixels = panel_pixels(to / "panel_11.png", 160, 200)
    assert colour_at(pixels, 40, 70) == REFINED_COLOUR  # refined top border
    assert colour_at(pixels, 99, 70) == REFINED_COLOUR  # refined bottom border
    assert colour_at(pixels, 70, 30) == REFINED_COLOUR  # refined left border
    assert colour_at(pixels, 70, 50) == ORIGINAL_COLOUR  # original left border
    assert colour_at(pixels, 89, 75) == ORIGINAL_COLOUR  # original bottom border
    assert colour_at(pixels, 70, 45) == BOX_COLOUR  # input box's left edge
    assert colour_at(pixels, 70, 75) == GRAY  # inside both masks: the image itself
    assert colour_at(pixels, 10, 150) == GRAY  # outside everything

    # annotation 21 on a 1024x768 image: scaled to 512x384, refined top at row 100, original at 110.
    pixels = panel_pixels(to / "panel_21.png", 384, 512)
    assert colour_at(pixels, 100, 250) == REFINED_COLOUR
    assert colour_at(pixels, 110, 250) == ORIGINAL_COLOUR
    assert colour_at(pixels, 200, 250) != REFINED_COLOUR
    with Image.open(to / "panel_21.png") as image:
        assert image.width == 512  # downscaled to the 512 px long side

    # annotation 13 had no original mask: no orange anywhere.
    pixels = panel_pixels(to / "panel_13.png", 160, 200)
    assert not (pixels == ORIGINAL_COLOUR).all(axis=-1).any()
    assert colour_at(pixels, 5, 30) == REFINED_COLOUR


def test_n_spread_and_worst(tmp_path: Path) -> None:
    out, annotations, _ = make_run(tmp_path)
    ious = expected_ious()
    ranked = sorted((a for a in ious if ious[a] is not None), key=ious.get)  # 11, 12, 31, 21

    preview(out, tmp_path / "spread", "--annotations", str(annotations), "--n", "2")
    page = parse_index(tmp_path / "spread")
    assert [f["id"] for f in page.figures] == [ranked[0], ranked[-1]]  # lowest and highest
    assert len(list((tmp_path / "spread").glob("*.png"))) == 2

    preview(out, tmp_path / "worst", "--annotations", str(annotations), "--n", "3", "--worst")
    page = parse_index(tmp_path / "worst")
    assert ranked[2] == 31  # its image is missing: skipped, still counted among the 3
    assert [f["id"] for f in page.figures] == ranked[:2]
    assert page.skipped == [31]
    assert sorted(p.name for p in (tmp_path / "worst").glob("*.png")) == sorted(
        f"panel_{a}.png" for a in ranked[:2]
    )


def test_without_annotations_shows_refined_only(tmp_path: Path) -> None:
    out, _, _ = make_run(tmp_path)
    to = tmp_path / "preview"
    preview(out, to, "--n", "1", "--worst")
    page = parse_index(to)
    assert [f["id"] for f in page.figures] == [11]
    assert "No --annotations given" in "".join(page.text)
    pixels = panel_pixels(to / "panel_11.png", 160, 200)
    assert colour_at(pixels, 40, 70) == REFINED_COLOUR
    assert colour_at(pixels, 70, 50) == GRAY  # where the original border would be
    assert not (pixels == ORIGINAL_COLOUR).all(axis=-1).any()


def test_moved_images(tmp_path: Path) -> None:
    out, annotations, imgs = make_run(tmp_path)
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(str(imgs), moved / "imgs")

    preview(out, tmp_path / "stale", "--annotations", str(annotations))
    page = parse_index(tmp_path / "stale")
    assert page.figures == [] and sorted(page.skipped) == sorted(ANNOTATIONS)

    for extra in ([], ["--annotations", str(annotations)]):  # suffix rule, then ROOT/file_name
        to = tmp_path / f"moved{len(extra)}"
        preview(out, to, "--images", str(moved), *extra)
        page = parse_index(to)
        assert sorted(f["id"] for f in page.figures) == [11, 12, 13, 21]
        assert page.skipped == [31]


def test_empty_out_exits_2(tmp_path: Path) -> None:
    empty = tmp_path / "out"
    empty.mkdir()
    (empty / "summary.json").write_text("{}")
    for out in (empty, tmp_path / "absent"):
        result = CliRunner().invoke(app, ["preview", str(out), "--to", str(tmp_path / "p")])
        assert result.exit_code == 2, (result.output, result.exception)
        message = result.stderr.strip()
        assert message.startswith("error: ") and "\n" not in message and "part-" in message
    assert not (tmp_path / "p" / "index.html").exists()


def test_outline_is_the_inner_border() -> None:
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    ring = mask.copy()
    ring[2:5, 2:5] = False
    assert (outline(mask, 1) == ring).all()
    inner = mask.copy()
    inner[3, 3] = False  # two erosions leave only the centre
    assert (outline(mask, 2) == inner).all()
    full = np.ones((4, 4), bool)
    assert outline(full, 1).sum() == 12  # the image edge counts as a border


def test_spread_selection_is_even() -> None:
    rows = [
        {"status": "ok", "iou_vs_original": v / 10, "image_id": 1, "annotation_id": v, "ann_index": v}
        for v in range(10, 0, -1)
    ]
    rows.append({"status": "ok", "iou_vs_original": None, "image_id": 1, "annotation_id": 99, "ann_index": 0})
    rows.append({"status": "invalid_box", "iou_vs_original": None, "image_id": 1, "annotation_id": 98})
    assert [r["annotation_id"] for r in select_rows(rows, 4, worst=False)] == [1, 4, 7, 10]
    assert [r["annotation_id"] for r in select_rows(rows, 3, worst=True)] == [1, 2, 3]
    assert [r["annotation_id"] for r in select_rows(rows, 20, worst=False)] == [*range(1, 11), 99]


# --- panels and image lookup without the command line -----------------------------------------------


def panel_row(height: int, width: int, refined, **values) -> dict:
    return {
        "image_id": 1,
        "annotation_id": 5,
        "ann_index": 0,
        "category_id": 2,
        "image_uri": "/data/imgs/a.png",
        "score": 0.875,
        "iou_vs_original": 0.5,
        "boundary_iou_vs_original": None,
        "segmentation": rle(rect(height, width, refined)),
        **values,
    }


def decoded(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def test_render_panel_draws_both_outlines_the_box_and_a_caption() -> None:
    image = np.full((100, 120, 3), GRAY, np.uint8)
    original = Original(json.dumps(rle(rect(100, 120, (30, 70, 40, 90)))), [35, 25, 60, 50], None)
    png, note = render_panel(panel_row(100, 120, (20, 80, 20, 100)), image, original)
    assert note is None
    pixels = decoded(png)
    assert pixels.shape[0] > 100 and pixels.shape[1] >= 120  # the caption strip lies below the image
    assert colour_at(pixels, 20, 60) == REFINED_COLOUR  # refined top border
    assert colour_at(pixels, 79, 60) == REFINED_COLOUR  # refined bottom border (inner outline)
    assert colour_at(pixels, 50, 40) == ORIGINAL_COLOUR  # original left border
    assert colour_at(pixels, 50, 35) == BOX_COLOUR  # the input box's left edge (x 35)
    assert colour_at(pixels, 50, 60) == GRAY and colour_at(pixels, 5, 5) == GRAY
    caption = pixels[100:]
    assert (caption == 255).all(axis=-1).any() and not (caption == GRAY).all(axis=-1).any()


def test_render_panel_notes_what_it_could_not_draw() -> None:
    image = np.full((40, 50, 3), GRAY, np.uint8)
    row = panel_row(40, 50, (10, 30, 10, 40))
    for original, expected in (
        (Original("", [], None), "the input annotation has no mask"),
        (Original("{not json", [], None), "original mask unusable"),
        (None, None),
    ):
        png, note = render_panel(row, image, original)
        assert (note or "").startswith(expected or ""), note
        assert (note is None) == (expected is None)
        pixels = decoded(png)[:40, :50]
        assert colour_at(pixels, 10, 20) == REFINED_COLOUR
        assert not (pixels == ORIGINAL_COLOUR).all(axis=-1).any()
    with pytest.raises(ValueError, match="image is 50x40 but the refined mask is 60x40"):
        render_panel(panel_row(40, 60, (10, 30, 10, 40)), image, None)
    with pytest.raises(ValueError, match="no refined segmentation"):
        render_panel(panel_row(40, 50, (10, 30, 10, 40), segmentation=None), image, None)


def test_render_panel_scales_large_images_to_the_panel_side() -> None:
    image = np.full((600, 1200, 3), GRAY, np.uint8)
    pixels = decoded(render_panel(panel_row(600, 1200, (100, 500, 200, 1000)), image, None)[0])
    assert pixels.shape[1] == 512 and pixels.shape[0] > 256  # 1200x600 drawn at 512x256
    assert colour_at(pixels, round(100 * 512 / 1200), 256) == REFINED_COLOUR


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


def test_write_panels_writes_readable_rows_and_notes_the_rest(tmp_path: Path) -> None:
    Image.new("RGB", (50, 40), GRAY).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    good = panel_row(40, 50, (10, 30, 10, 40), image_uri=str(tmp_path / "a.png"))
    again = {**good, "image_id": 2, "ann_index": 1}  # the same annotation id on another image
    missing = panel_row(40, 50, (10, 30, 10, 40), annotation_id=6, image_uri=str(tmp_path / "none.png"))
    broken = panel_row(40, 50, (10, 30, 10, 40), annotation_id=7, image_uri=str(tmp_path / "bad.png"))
    to = tmp_path / "preview"
    panels = write_panels([good, again, missing, broken], str(to), None, None)
    assert [panel.file for panel in panels] == ["panel_5.png", "panel_5_2.png", None, None]
    assert panels[0].note is None and "not found" in panels[2].note and "bad.png" in panels[3].note
    assert sorted(p.name for p in to.iterdir()) == ["panel_5.png", "panel_5_2.png"]
    assert colour_at(decoded((to / "panel_5.png").read_bytes()), 10, 20) == REFINED_COLOUR

    originals = {0: Original(json.dumps(rle(rect(40, 50, (12, 28, 12, 38)))), [], None)}  # by ann_index
    panels = write_panels([good, again], str(tmp_path / "with"), None, originals)
    assert panels[0].note is None and panels[1].note == "annotation not found in --annotations"
    assert colour_at(decoded((tmp_path / "with" / "panel_5.png").read_bytes()), 20, 12) == ORIGINAL_COLOUR


def test_unusable_annotations_exit_2(tmp_path: Path) -> None:
    out, _, _ = make_run(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    for unusable in (bad, tmp_path / "absent.json"):
        result = CliRunner().invoke(
            app, ["preview", str(out), "--to", str(tmp_path / "p"), "--annotations", str(unusable)]
        )
        assert result.exit_code == 2, (result.output, result.exception)
        message = result.stderr.strip()
        assert message.startswith("error: ") and "\n" not in message and unusable.name in message
    assert not (tmp_path / "p" / "index.html").exists()


def test_preview_to_s3(tmp_path: Path, s3_bucket: str) -> None:
    import s3fs

    out, annotations, _ = make_run(tmp_path)
    to = f"s3://{s3_bucket}/preview"
    result = preview(out, to, "--annotations", str(annotations), "--n", "2")
    assert f"-> {to}/index.html" in result.output
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    names = sorted(path.rsplit("/", 1)[1] for path in fs.ls(f"{s3_bucket}/preview"))
    assert names == ["index.html", "panel_11.png", "panel_21.png"]
    page = IndexParser()
    page.feed(fs.cat(f"{s3_bucket}/preview/index.html").decode())
    assert [f["id"] for f in page.figures] == [11, 21]


def test_rows_are_matched_to_their_own_annotation_when_ids_repeat(tmp_path: Path) -> None:
    """Three annotations with id 7, two on one image and one on another: each panel shows its own
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
            | {"bbox": [original[2], original[0], original[3] - original[2], original[1] - original[0]]}
            for image_id, _, original in shapes.values()
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    ious = {
        p: iou(rect(160, 200, refined), rect(160, 200, original))
        for p, (_, refined, original) in shapes.items()
    }
    rows = [
        {"image_id": image_id, "image_uri": str(tmp_path / "imgs" / ("a.png" if image_id == 1 else "b.png"))}
        | {
            "annotation_id": 7,
            "ann_index": position,
            "category_id": 1,
            "segmentation": rle(rect(160, 200, refined)),
        }
        | {"score": 0.9, "iou_vs_original": ious[position], "status": "ok", "model": "vit_tiny"}
        for position, (image_id, refined, _) in shapes.items()
    ]
    out = tmp_path / "out"
    (out / "rows").mkdir(parents=True)
    for position, row in enumerate(rows):  # one part per row: the rows of one id in different files
        pq.write_table(
            pa.Table.from_pylist([row], schema=REFINED_ANNOTATION), out / "rows" / f"part-{position}.parquet"
        )

    to = tmp_path / "preview"
    preview(out, to, "--annotations", str(tmp_path / "coco.json"))
    page = parse_index(to)
    assert len(page.figures) == 3 and len({f["src"] for f in page.figures}) == 3
    for figure in page.figures:
        (position,) = [p for p in shapes if abs(ious[p] - figure["iou"]) < 1e-6]
        _, (y0, y1, x0, x1), (oy0, oy1, ox0, ox1) = shapes[position]
        pixels = panel_pixels(to / figure["src"], 160, 200)
        assert colour_at(pixels, y0, (x0 + x1) // 2) == REFINED_COLOUR, position  # its own refined top
        assert colour_at(pixels, (oy0 + oy1) // 2, ox0) == ORIGINAL_COLOUR, position  # its own original
        others = [shapes[p][2] for p in shapes if p != position and shapes[p][0] == shapes[position][0]]
        for oy0_, oy1_, ox0_, _ in others:  # and not the other annotation's of the same image and id
            assert colour_at(pixels, (oy0_ + oy1_) // 2, ox0_) != ORIGINAL_COLOUR, position
