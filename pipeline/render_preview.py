"""The `hqsam preview` run: PNG panels of original vs refined masks and an index.html sorted by change.

The refined rows come from OUT/rows/part-*.parquet. The original masks are not in that output: they
come from the run's input (--annotations, COCO JSON or Parquet manifest), matched to the rows by
the annotation's position in it (`ann_index`; ids may repeat); without it the panels show the
refined outline only.
"""

from __future__ import annotations

import html
import io
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError, one_line
from hqsam.hqsam_core.images import decode_image
from hqsam.hqsam_core.masks import bbox_xywh_to_xyxy, decode_rle, segmentation_to_mask
from hqsam.pipeline.manifest import ManifestError, read_manifest
from hqsam.pipeline.read_refined import ROWS_FOLDER, refined_parts
from hqsam.schemas.status import Status

ORIGINAL_COLOUR = (255, 140, 0)  # orange
REFINED_COLOUR = (0, 255, 255)  # cyan
BOX_COLOUR = (255, 0, 255)  # magenta
PANEL_SIDE = 512  # longest side of a panel's image, in pixels; larger images are scaled down
OUTLINE_PX = 2  # outline width, drawn inside each mask's border
SUFFIX_DEPTH = 4  # --images without --annotations: how many trailing path parts of image_uri to try

ROW_COLUMNS = [
    "image_id",
    "image_uri",
    "annotation_id",
    "ann_index",
    "category_id",
    "score",
    "iou_vs_original",
    "boundary_iou_vs_original",
    "status",
]


class PreviewError(HqsamError, ValueError):
    """OUT or --annotations cannot be used; the message is one sentence (exit code 2)."""


@dataclass
class Original:
    segmentation: str  # COCO segmentation as JSON text, "" when the input had none
    bbox: list[float]  # COCO xywh, [] when absent
    image_uri: str | None  # where the manifest puts the image (honours --images)


@dataclass
class Panel:
    row: dict
    file: str | None = None  # panel PNG name inside DIR; None when skipped
    note: str | None = None  # why it was skipped, or what is missing from it


@dataclass
class PreviewResult:
    index: str  # URI of index.html
    panels: list[Panel]
    rows_total: int
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def written(self) -> list[Panel]:
        return [panel for panel in self.panels if panel.file]

    @property
    def skipped(self) -> list[Panel]:
        return [panel for panel in self.panels if not panel.file]


def run_preview(
    out: str,
    to: str,
    *,
    images: str | None = None,
    annotations: str | None = None,
    n: int = 24,
    worst: bool = False,
) -> PreviewResult:
    """Write `to`/panel_<annotation_id>.png for up to `n` refined rows of `out`, and `to`/index.html."""
    parts = refined_parts(out)
    if not parts:
        raise PreviewError(
            f"{out} holds no {ROWS_FOLDER}/part-*.parquet files; is it the --out of `hqsam refine`?"
        )
    rows = _read_rows(parts)
    selected = select_rows(rows, n, worst=worst)
    _attach_segmentations(parts, selected)
    originals = _read_originals(annotations, images, selected) if annotations else None
    panels = write_panels(selected, to, images, originals)
    statuses = dict(sorted(Counter(row["status"] for row in rows).items()))
    result = PreviewResult(
        index=storage.join(to, "index.html"), panels=panels, rows_total=len(rows), statuses=statuses
    )
    page = index_html(out, result, worst=worst, originals=annotations is not None, ok=len(_ok(rows)))
    storage.write_bytes(result.index, page.encode())
    return result


def write_panels(selected: list[dict], to: str, images: str | None, originals: dict | None) -> list[Panel]:
    """Render and write one panel per selected row; a row whose image or mask is unusable gets a note
    instead. `originals` is None without --annotations (refined outlines only)."""
    panels, names, cache = [], set(), {}
    for row in selected:
        panel = Panel(row)
        panels.append(panel)
        original = originals.get(row["ann_index"]) if originals is not None else None
        if originals is not None and original is None:
            panel.note = "annotation not found in --annotations"
        try:
            image = _load_image(row, images, original, cache)
            png, missing = render_panel(row, image, original)
        except (OSError, ValueError) as error:
            panel.note = one_line(error)
            continue
        panel.note = panel.note or missing
        panel.file = _panel_name(row, names)
        storage.write_bytes(storage.join(to, panel.file), png)
    return panels


# --- rows -------------------------------------------------------------------------------------


def _read_rows(parts: list[str]) -> list[dict]:
    rows = []
    for index, uri in enumerate(parts):
        fs, path = storage.url_to_fs(uri)
        for row in pq.read_table(path, columns=ROW_COLUMNS, filesystem=fs).to_pylist():
            row["part"] = index
            rows.append(row)
    return rows


def _ok(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row["status"] == Status.OK]


def _change_key(row: dict) -> tuple:
    iou = row["iou_vs_original"]
    return (
        iou is None or math.isnan(iou),
        iou if iou is not None else 0.0,
        row["ann_index"],
    )


def select_rows(rows: list[dict], n: int, *, worst: bool) -> list[dict]:
    """Up to `n` ok rows in ascending iou_vs_original (largest change first); rows without one go last.

    worst: the `n` lowest. Otherwise evenly spaced ranks over the whole range, lowest and highest included.
    """
    ranked = sorted(_ok(rows), key=_change_key)
    with_iou = [row for row in ranked if not _change_key(row)[0]]
    without = ranked[len(with_iou) :]
    if worst or len(with_iou) <= n:
        return (with_iou + without)[:n]
    if n == 1:
        return with_iou[:1]
    ranks = np.floor(np.linspace(0, len(with_iou) - 1, n) + 0.5).astype(int)
    return [with_iou[k] for k in sorted(set(ranks.tolist()))]


def _attach_segmentations(parts: list[str], selected: list[dict]) -> None:
    """Read the refined RLEs of the selected rows only (a run's whole segmentation column is large)."""
    wanted: dict[int, list[dict]] = {}
    for row in selected:
        wanted.setdefault(row["part"], []).append(row)
    for index, rows in wanted.items():
        fs, path = storage.url_to_fs(parts[index])
        positions = sorted({row["ann_index"] for row in rows})
        table = pq.read_table(
            path,
            columns=["ann_index", "bbox", "segmentation"],
            filesystem=fs,
            filters=[("ann_index", "in", positions)],
        )
        found = {r["ann_index"]: r for r in table.to_pylist()}
        for row in rows:
            match = found.get(row["ann_index"]) or {}
            row["bbox"] = match.get("bbox")
            row["segmentation"] = match.get("segmentation")


def _read_originals(annotations: str, images: str | None, selected: list[dict]) -> dict:
    """ann_index -> Original for the selected rows, read like `hqsam refine` reads input: the input
    annotation at the row's position, when it is on the row's image (else OUT is another file's)."""
    try:
        tasks = read_manifest(annotations, images).tasks
    except ManifestError as error:
        raise PreviewError(str(error)) from None
    wanted = {row["ann_index"]: row["image_id"] for row in selected}
    image_ids = pa.array(sorted(set(wanted.values())), pa.int64())
    originals = {}
    for task in tasks.filter(pc.is_in(tasks["image_id"], value_set=image_ids)).to_pylist():
        for position, bbox, segmentation in zip(task["ann_indices"], task["bboxes"], task["segmentations"]):
            if wanted.get(position) == task["image_id"]:
                originals[position] = Original(segmentation, bbox or [], task["image_uri"])
    return originals


# --- images -----------------------------------------------------------------------------------


def image_candidates(image_uri: str, images: str | None, original: Original | None) -> list[str]:
    """Where to look for a row's image, in order.

    No --images: the row's image_uri, as the run read it. --images with --annotations: ROOT joined
    with the image's file_name (as `hqsam refine --images ROOT` would). --images alone: ROOT joined
    with the last SUFFIX_DEPTH, ..., 1 path parts of image_uri, longest first.
    """
    if images is None:
        return [image_uri]
    if original is not None and original.image_uri:
        return [original.image_uri]
    path = image_uri.split("://", 1)[-1]
    parts = [part for part in path.split("/") if part]
    depth = min(SUFFIX_DEPTH, len(parts))
    return [storage.join(images, "/".join(parts[-k:])) for k in range(depth, 0, -1)]


def _load_image(row: dict, images: str | None, original: Original | None, cache: dict) -> np.ndarray:
    candidates = image_candidates(row["image_uri"], images, original)
    key = tuple(candidates)
    if key not in cache:
        cache[key] = _read_first(candidates, _mask_size(row))
    image = cache[key]
    if isinstance(image, Exception):
        raise image
    return image


def _read_first(candidates: list[str], size: tuple[int, int]) -> np.ndarray | Exception:
    for uri in candidates:
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as error:
            return OSError(f"cannot read {uri}: {one_line(error)}")
        try:
            return decode_image(data, expected_size=size)
        except ValueError as error:
            return ValueError(f"{uri}: {one_line(error)}")
    return FileNotFoundError(f"image not found: {', '.join(candidates)}")


def _mask_size(row: dict) -> tuple[int, int]:
    segmentation = row.get("segmentation")
    if not segmentation:
        raise ValueError("the row has no refined segmentation")
    height, width = segmentation["size"]
    return int(height), int(width)


# --- panels -----------------------------------------------------------------------------------


def outline(mask: np.ndarray, width: int = OUTLINE_PX) -> np.ndarray:
    """The mask's pixels within `width` of its border: mask XOR its (4-neighbour) erosion.

    Outside the image counts as background, so a mask touching the image edge is outlined there too.
    """
    eroded = mask.astype(bool)
    for _ in range(width):
        padded = np.pad(eroded, 1, constant_values=False)
        eroded = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
    return mask.astype(bool) & ~eroded


def _scaled(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to `size` (width, height)."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127


def render_panel(row: dict, image: np.ndarray, original: Original | None) -> tuple[bytes, str | None]:
    """PNG bytes of one panel, and a note on what could not be drawn (None when complete).

    `original` is None without --annotations: the panel then shows the refined outline only."""
    height, width = _mask_size(row)
    if image.shape[:2] != (height, width):
        raise ValueError(
            f"image is {image.shape[1]}x{image.shape[0]} but the refined mask is {width}x{height}"
        )
    refined = decode_rle(row["segmentation"])
    original_mask, note = _original_mask(original, height, width)
    scale = min(1.0, PANEL_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = Image.fromarray(image)
    if size != (width, height):
        picture = picture.resize(size, Image.BILINEAR)
    if original is not None and len(original.bbox) == 4:
        x0, y0, x1, y1 = (v * scale for v in bbox_xywh_to_xyxy(original.bbox))
        ImageDraw.Draw(picture).rectangle([x0, y0, x1, y1], outline=BOX_COLOUR, width=1)
    pixels = np.array(picture)
    if original_mask is not None:
        pixels[outline(_scaled(original_mask, size))] = ORIGINAL_COLOUR
    pixels[outline(_scaled(refined, size))] = REFINED_COLOUR
    buffer = io.BytesIO()
    _with_caption(Image.fromarray(pixels), _caption(row)).save(buffer, format="PNG")
    return buffer.getvalue(), note


def _original_mask(
    original: Original | None, height: int, width: int
) -> tuple[np.ndarray | None, str | None]:
    """The input annotation's mask, or None and a note on why it cannot be drawn."""
    if original is None:
        return None, None
    if not original.segmentation:
        return None, "the input annotation has no mask"
    try:
        return segmentation_to_mask(orjson.loads(original.segmentation), height, width), None
    except (ValueError, TypeError, orjson.JSONDecodeError) as error:
        return None, f"original mask unusable: {one_line(error)}"


def _with_caption(picture: Image.Image, lines: list[str]) -> Image.Image:
    """`picture` above a black strip with `lines` in white, widened when the text needs it."""
    font = ImageFont.load_default(size=12)
    text_width = max(ImageDraw.Draw(picture).textlength(line, font=font) for line in lines)
    width, height = picture.size
    canvas = Image.new("RGB", (max(width, math.ceil(text_width) + 8), height + 16 * len(lines) + 6))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((4, height + 3 + 16 * k), line, fill=(255, 255, 255), font=font)
    return canvas


def _number(value, digits: int = 3) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def _caption(row: dict) -> list[str]:
    return [
        f"image {row['image_id']}  annotation {row['annotation_id']}  category {row['category_id']}",
        f"score {_number(row['score'])}  IoU {_number(row['iou_vs_original'])}  "
        f"boundary IoU {_number(row['boundary_iou_vs_original'])}",
    ]


def _panel_name(row: dict, taken: set[str]) -> str:
    """panel_<id>.png; annotation ids repeat across images in some datasets (then the image id is
    added), even within one image (then also the annotation's position in the input)."""
    stem = f"panel_{row['annotation_id']}"
    names = (
        f"{stem}.png",
        f"{stem}_{row['image_id']}.png",
        f"{stem}_{row['image_id']}_{row['ann_index']}.png",
    )
    name = next((name for name in names if name not in taken), names[-1])
    taken.add(name)
    return name


# --- index.html -------------------------------------------------------------------------------

STYLE = """
body { font-family: sans-serif; margin: 1.5em; background: #fafafa; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 1em; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; padding: .5em; }
figure img { max-width: 100%; display: block; }
figcaption { font-size: .85em; margin-top: .3em; }
.swatch { display: inline-block; width: 1em; height: 1em; vertical-align: middle; margin: 0 .3em 0 1em; }
.note { color: #a40; }
"""


def _rgb(colour: tuple[int, int, int]) -> str:
    return "rgb({}, {}, {})".format(*colour)


def index_html(out: str, result: PreviewResult, *, worst: bool, originals: bool, ok: int) -> str:
    """The preview page: a summary, the legend, a grid of the written panels, then the skipped rows.

    `originals`: whether --annotations was given; `ok`: how many ok rows OUT holds."""
    e = html.escape
    statuses = ", ".join(f"{status} {count}" for status, count in result.statuses.items())
    how = "the lowest" if worst else "a spread over the range of"
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8">',
        f"<title>hqsam preview of {e(out)}</title><style>{STYLE}</style></head><body>",
        f"<h1>hqsam preview of {e(out)}</h1>",
        f'<p class="summary">{result.rows_total} rows ({e(statuses)}). Showing {len(result.panels)} of '
        f"{ok} ok rows: {how} iou_vs_original (IoU of refined vs original mask), sorted ascending, "
        "so the largest changes come first; rows without an original mask come last.</p>",
        '<p class="legend">'
        f'<span class="swatch" style="background:{_rgb(ORIGINAL_COLOUR)}"></span>original mask'
        f'<span class="swatch" style="background:{_rgb(REFINED_COLOUR)}"></span>refined mask'
        f'<span class="swatch" style="background:{_rgb(BOX_COLOUR)}"></span>input box</p>',
    ]
    if not originals:
        parts.append(
            '<p class="note">No --annotations given: the original masks and boxes are unknown, '
            "so the panels show the refined outline only.</p>"
        )
    parts += ['<div class="grid">', *(_figure(panel) for panel in result.written), "</div>"]
    if result.skipped:
        parts.append(f"<h2>Skipped ({len(result.skipped)})</h2><ul>")
        for panel in result.skipped:
            row = panel.row
            parts.append(
                f'<li class="skipped" data-annotation-id="{row["annotation_id"]}">image {row["image_id"]} '
                f"annotation {row['annotation_id']}: {e(panel.note or 'skipped')}</li>"
            )
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _figure(panel: Panel) -> str:
    """One written panel as a linked figure with its caption and note."""
    e = html.escape
    row = panel.row
    iou = row["iou_vs_original"]
    note = f'<br><span class="note">{e(panel.note)}</span>' if panel.note else ""
    caption = "<br>".join(e(line) for line in _caption(row))
    return (
        f'<figure data-annotation-id="{row["annotation_id"]}" data-image-id="{row["image_id"]}" '
        f'data-iou="{"" if iou is None else repr(float(iou))}">'
        f'<a href="{e(panel.file)}"><img src="{e(panel.file)}" alt="{e(_caption(row)[0])}"></a>'
        f"<figcaption>{caption}{note}</figcaption></figure>"
    )
