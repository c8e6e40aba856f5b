"""The review page in a real browser: Debian's Chromium, headless, driven through chromedriver.

A refine output is made from the bundled example dataset (examples/shapes): its images, its COCO
file as the input, and for each annotation a "refined" mask taken from the image itself (the pixels
of the shape's flat colour near the coarse polygon), with its IoU and boundary IoU against the
polygon computed by hqsam's own metrics, written as real Parquet parts. `hqsam review` writes the
site; the browser opens it from file://, a person's keys decide three rows, the page exports
decisions.json, and `hqsam apply` writes the COCO file that pycocotools reads back.

Set HQSAM_REVIEW_SCREENSHOT=docs/review.png to save the README's screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from typer.testing import CliRunner

from hqsam.jobs.cli import app
from hqsam.pipeline.review_page import QUALITY_COLUMNS
from hqsam.pipeline.write_parquet import write_atomically
from hqsam.schemas.refined import REFINED_ANNOTATION
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
EXAMPLE = ROOT / "examples" / "shapes"
FAILED_POSITION = 5  # refined rows but this one: inference_failed, never in the queue
REJECTED_POSITION = 0  # the only row the policy rejects: the first in the queue
SCREENSHOT_ENV = "HQSAM_REVIEW_SCREENSHOT"


def needs_chromium() -> None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            pytest.skip(f"{path} is absent: apt-get install {package} (.ci/run does)")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode()}


def shape_mask(pixels: np.ndarray, polygon_mask: np.ndarray) -> np.ndarray:
    """The pixels of the shape's flat fill colour (the commonest colour under the polygon; the
    background is noise) within 10 px of the polygon."""
    colours, counts = np.unique(pixels[polygon_mask].reshape(-1, 3), axis=0, return_counts=True)
    colour = colours[counts.argmax()].astype(int)
    near = cv2.dilate(polygon_mask.astype(np.uint8), np.ones((21, 21), np.uint8)).astype(bool)
    return near & (np.abs(pixels.astype(int) - colour).max(axis=-1) <= 8)


def make_out(root: Path) -> tuple[Path, Path, dict]:
    """root/data (the example's images and COCO file) and root/out/rows; returns (out, the COCO
    file, ann_index -> row)."""
    from hqsam.hqsam_core.metrics import boundary_iou, mask_iou

    data = root / "data"
    shutil.copytree(EXAMPLE, data)
    annotations = data / "annotations.json"
    coco = json.loads(annotations.read_text())
    images = {image["id"]: image for image in coco["images"]}
    rows = {}
    for position, annotation in enumerate(coco["annotations"]):
        image = images[annotation["image_id"]]
        height, width = image["height"], image["width"]
        base = {
            "image_id": image["id"],
            "image_uri": str(data / image["file_name"]),
            "model": "vit_tiny:random",
        }
        base |= {"file_name": image["file_name"], "width": width, "height": height, "iscrowd": 0}
        base |= {
            "annotation_id": annotation["id"],
            "ann_index": position,
            "category_id": annotation["category_id"],
        }
        if position == FAILED_POSITION:
            rows[position] = base | {"status": "inference_failed", "error": "RuntimeError: out of memory"}
            continue
        pixels = np.asarray(Image.open(data / image["file_name"]).convert("RGB"))
        polygon = mask_utils.frPyObjects(annotation["segmentation"], height, width)
        original = mask_utils.decode(mask_utils.merge(polygon)).astype(bool)
        refined = shape_mask(pixels, original)
        encoded = rle(refined)
        stability = 0.55 if position == REJECTED_POSITION else round(0.86 + 0.01 * position, 3)
        rows[position] = base | {
            "bbox": [float(v) for v in mask_utils.toBbox(encoded)],
            "area": int(refined.sum()),
            "segmentation": encoded,
            "score": round(0.8 + 0.015 * position, 3),
            "iou_vs_original": mask_iou(refined, original),
            "boundary_iou_vs_original": boundary_iou(refined, original),
            "prompt": "box",
            "stability": stability,
            "sam_hq_iou": round(0.99 - 0.02 * position, 3),
            "accepted": position != REJECTED_POSITION,
            "rejected_by": "stability >= 0.8" if position == REJECTED_POSITION else None,
            "status": "ok",
        }
    out = root / "out"
    (out / "rows").mkdir(parents=True)
    table = pa.Table.from_pylist(list(rows.values()), schema=REFINED_ANNOTATION)
    half = table.num_rows // 2  # two parts, as two batches of a run write them
    write_atomically(str(out / "rows" / "part-00000.parquet"), table.slice(0, half), sorted_by_position=True)
    write_atomically(str(out / "rows" / "part-00001.parquet"), table.slice(half), sorted_by_position=True)
    return out, annotations, rows


def browser(downloads: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,1700")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's script errors
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    return driver


def press(driver, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    for key in keys:
        ActionChains(driver).send_keys(key).perform()


def wait_for(path: Path, timeout: float = 20.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size and not list(path.parent.glob("*.crdownload")):
            return path
        time.sleep(0.1)
    raise AssertionError(f"{path} was not downloaded within {timeout} s: {list(path.parent.iterdir())}")


def not_blank(png: Path) -> None:
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 500 and pixels.std() > 20, (colours, pixels.std())


def test_review_in_chromium_then_apply(tmp_path: Path) -> None:
    needs_chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out, annotations, rows = make_out(tmp_path)
    site = tmp_path / "site"
    result = CliRunner().invoke(
        app, ["review", str(out), "--to", str(site), "--annotations", str(annotations), "--no-progress"]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    ok = [row for row in rows.values() if row["status"] == "ok"]
    categories = {row["category_id"] for row in ok}

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = browser(downloads)
    try:
        driver.get((site / "index.html").as_uri())
        WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.body.dataset.ready"))
        assert [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"] == []
        items = driver.find_elements(By.CSS_SELECTOR, "#queue > li.row")
        assert len(items) == len(ok)  # every ok row, each image readable
        charts = driver.find_elements(By.CSS_SELECTOR, "svg.hist")
        assert len(charts) == len(QUALITY_COLUMNS) * (1 + len(categories))  # "all", then per category
        images = driver.find_elements(By.CSS_SELECTOR, "#queue img")
        assert len(images) == 2 * len(ok)  # original and refined crop of each
        WebDriverWait(driver, 20).until(
            lambda d: d.execute_script(
                "return [...document.images].slice(0, 6).every(i => i.complete && i.naturalWidth > 0)"
            )
        )
        queue = [int(item.get_attribute("data-ann-index")) for item in items]
        assert queue[0] == REJECTED_POSITION  # rejected by the policy: first

        press(driver, "j", "k")  # down and back up: the first row again
        assert "current" in items[0].get_attribute("class")
        press(driver, "a", "r", "s")  # accept the first, reject the second, skip the third
        assert [items[k].get_attribute("data-decision") for k in range(4)] == ["accept", "reject", "skip", ""]
        assert "current" in items[3].get_attribute("class")
        counts = driver.find_element(By.ID, "counts")
        assert (counts.get_attribute("data-accept"), counts.get_attribute("data-reject")) == ("1", "1")
        assert counts.get_attribute("data-skip") == "1"
        assert counts.get_attribute("data-undecided") == str(len(ok) - 3)
        assert "row 4 of" in counts.text

        driver.execute_script("window.scrollTo(0, 0)")
        screenshot = tmp_path / "review.png"
        driver.save_screenshot(str(screenshot))
        not_blank(screenshot)
        press(driver, "e")
        exported = wait_for(downloads / "decisions.json")
    finally:
        driver.quit()

    decisions = json.loads(exported.read_text())
    assert decisions == {
        "hqsam_decisions": 1,
        "out": str(out),
        "decisions": [
            {"ann_index": queue[0], "annotation_id": rows[queue[0]]["annotation_id"], "decision": "accept"},
            {"ann_index": queue[1], "annotation_id": rows[queue[1]]["annotation_id"], "decision": "reject"},
        ],
    }
    final = tmp_path / "final.json"
    result = CliRunner().invoke(
        app,
        [
            "apply",
            str(out),
            "--decisions",
            str(exported),
            "--annotations",
            str(annotations),
            "--to",
            str(final),
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)

    written, source = COCO(str(final)), COCO(str(annotations))
    by_position = list(written.dataset["annotations"])
    for position, row in rows.items():
        annotation = by_position[position]
        mask = written.annToMask(annotation).astype(bool)
        original = source.annToMask(source.dataset["annotations"][position]).astype(bool)
        refined = mask_utils.decode(row["segmentation"]).astype(bool) if row["status"] == "ok" else None
        if position == queue[0]:  # rejected by the policy, accepted by the person
            expected, by = refined, "person"
        elif position == queue[1]:  # accepted by the policy, rejected by the person
            expected, by = original, "person"
        else:  # the skipped row and every undecided one follow the policy; the failed one is kept
            expected, by = (refined if row["status"] == "ok" else original), "policy"
        assert (mask == expected).all(), position
        assert annotation["hqsam"]["decided_by"] == by and annotation["hqsam"]["accepted"] == (
            expected is refined
        )

    target = os.environ.get(SCREENSHOT_ENV)
    if target:
        with Image.open(screenshot) as image:
            image.convert("RGB").quantize(colors=128).save(target, optimize=True)
