"""Benchmark: driver memory and time as the dataset grows (issue 14, "Targets").

Box-only Objects365-like COCO instances files (about 13 boxes per image, 365 categories, no
segmentations, annotations in shuffled image order) of --sizes annotations each, plus the
COCO-train-size file of benchmarks/manifest.py (860k annotations with polygons, 450 MB), each
measured in fresh child processes:

  first batch   run_refine(RefineConfig(FILE, OUT, format="parquet")) on the CPU with random
                vit_tiny weights, 4 images per refine call and per part file, from the call to the
                first refined batch reaching the driver; the run is then stopped (a patched
                ProgressReporter.advance raises). Phases from hqsam's log lines and ray.init.
  coco write    write_coco(FILE, OUT) with OUT/rows/ holding one synthesized row per annotation of
                FILE (ok rows with a tiny valid RLE; crowd rows crowd_skipped), 512 images per part.

Peak RSS is the child's VmHWM: the driver process only (Ray's workers are other processes). The
child's ru_maxrss is recorded too, but on Linux it starts at the parent's peak (exec keeps it), so
the parent here generates nothing itself: every step runs in a child.

The generated images are a few small real JPEGs next to each file (their true sizes recorded, every
box inside them); the COCO-train-size file's first --linked-images image names are hard links to
JPEGs of their recorded sizes in WORK/coco_train/images (the rest are missing: cheap failed rows).
A run with no refined batch within --first-batch-timeout is recorded as timed out (its peak RSS
still counts). Files go under --work and are reused on later runs (--regenerate writes them again).

    nice -n 19 .venv/bin/python benchmarks/scale.py --coco-train /work/data/coco_train.json
    nice -n 19 .venv/bin/python benchmarks/scale.py --sizes 20000 100000 --no-coco-train --json /tmp/s.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import resource
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import child_result, machine, status_kb, write_result  # noqa: E402

SIZES = (1_000_000, 3_000_000, 10_000_000)
BOXES_PER_IMAGE = 13  # Objects365: ~22M boxes on ~1.7M images
CATEGORIES = 365
PICTURES = ((64, 48), (48, 64), (64, 36), (56, 56))  # width, height of the small JPEGs named
IMAGES_PER_PART = 512  # synthesized OUT parts, as WriteParquetParts' default
REFINE_BATCH = 4  # images per refine call and per part file in the first-batch run
MODEL_LABEL = "vit_tiny:random"
MB = 2**20
# issue 14's targets
RSS_LIMIT_MB = 2048  # driver peak RSS at the largest size...
RSS_SPREAD_MB = 300  # ...and within this of the smallest size's
COCO_TRAIN_LIMITS = (15.0, 1536)  # first batch: seconds, peak RSS MB
GROWTH_SLACK = 1.1  # time ratio largest/smallest <= size ratio * this


# ----------------------------------------------------------------------------- generating the files


def generate_objects365(path: Path, annotations: int, seed: int, chunk: int = 250_000) -> dict:
    """Write a box-only Objects365-like instances file, its JPEGs and its arrays (PATH.npz)."""
    rng = np.random.default_rng(seed)
    images = max(1, round(annotations / BOXES_PER_IMAGE))
    picture = rng.integers(0, len(PICTURES), images)
    widths, heights = np.array(PICTURES)[picture].T
    names = write_pictures(path.parent)
    # every image gets one box, the rest fall at random; the file lists them in shuffled order
    owner = rng.permutation(
        np.concatenate([np.arange(images), rng.integers(0, images, annotations - images)])
    )
    categories = rng.integers(1, CATEGORIES + 1, annotations)
    boxes = np.empty((annotations, 4), np.float64)
    with open(path, "wb") as out:
        out.write(orjson.dumps(objects365_head())[:-1] + b',"images":[')
        for start in range(0, images, chunk):
            stop = min(start + chunk, images)
            records = [
                {"height": int(heights[i]), "id": i + 1, "license": 1 + i % 8, "width": int(widths[i]),
                 "file_name": names[picture[i]], "url": f"https://example.invalid/o365/{i + 1}.jpg"}
                for i in range(start, stop)
            ]  # fmt: skip
            out.write((b"," if start else b"") + orjson.dumps(records)[1:-1])
        out.write(b'],"annotations":[')
        for start in range(0, annotations, chunk):
            stop = min(start + chunk, annotations)
            box = random_boxes(rng, widths[owner[start:stop]], heights[owner[start:stop]])
            boxes[start:stop] = box
            out.write(
                (b"," if start else b"") + box_records(start, box, owner[start:stop], categories[start:stop])
            )
        out.write(b'],"categories":')
        out.write(orjson.dumps([{"name": f"object {i}", "id": i} for i in range(1, CATEGORIES + 1)]))
        out.write(b"}")
    np.savez(
        arrays_path(path), image_row=owner, image_id=owner + 1, ann_id=np.arange(1, annotations + 1),
        category_id=categories, bbox=boxes, iscrowd=np.zeros(annotations, np.int8),
        widths=widths, heights=heights,
    )  # fmt: skip
    return {"annotations": annotations, "images": images, "file_mb": path.stat().st_size / MB}


def objects365_head() -> dict:
    return {
        "info": {"description": "hqsam benchmark: Objects365-like box-only instances", "version": "1.0"},
        "licenses": [{"url": f"https://example.invalid/license/{i}", "id": i, "name": f"License {i}"} for i in range(1, 9)],
    }  # fmt: skip


def write_pictures(folder: Path) -> list[str]:
    """The small JPEGs every generated image record names; their file names."""
    names = []
    for width, height in PICTURES:
        name = f"o365_{width}x{height}.jpg"
        write_jpeg(folder / name, width, height)
        names.append(name)
    return names


def write_jpeg(path: Path, width: int, height: int) -> None:
    """A smooth gradient JPEG of this size (small on disk at any size), unless one is there."""
    from PIL import Image

    if path.exists():
        return
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    pixels = np.stack([x, y, (x + y) / 2], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def random_boxes(rng: np.random.Generator, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """COCO xywh boxes inside their images, 0.01 px steps: many small, a tail of large ones."""
    n = len(widths)
    scale = np.clip(rng.lognormal(np.log(0.25), 0.7, (2, n)), 0.05, 1.0)
    w = np.maximum(1.0, np.floor(scale[0] * widths * 100) / 100)
    h = np.maximum(1.0, np.floor(scale[1] * heights * 100) / 100)
    x = np.floor(rng.random(n) * (widths - w) * 100) / 100
    y = np.floor(rng.random(n) * (heights - h) * 100) / 100
    return np.stack([x, y, w, h], axis=1)


def box_records(first: int, boxes: np.ndarray, owner: np.ndarray, categories: np.ndarray) -> bytes:
    """Objects365's annotation records of one chunk, as JSON without the enclosing brackets."""
    records = [
        {"id": first + k + 1, "iscrowd": 0, "isfake": 0, "area": round(box[2] * box[3], 2),
         "isreflected": 0, "bbox": box, "image_id": image + 1, "category_id": category}
        for k, (box, image, category) in enumerate(zip(boxes.tolist(), owner.tolist(), categories.tolist()))
    ]  # fmt: skip
    return orjson.dumps(records)[1:-1]


def arrays_path(path: Path) -> Path:
    return path.with_suffix(".npz")


def coco_arrays(path: Path, dest: Path) -> dict:
    """The per-annotation arrays of any COCO instances file (streamed with ijson), saved at `dest`."""
    import ijson

    with open(path, "rb") as handle:
        sizes = [
            (r["id"], r["width"], r["height"]) for r in ijson.items(handle, "images.item", use_float=True)
        ]
    ids, widths, heights = (np.array(column, np.int64) for column in zip(*sizes))
    order = np.argsort(ids, kind="stable")
    keys = ("image_id", "id", "category_id", "bbox", "iscrowd")
    with open(path, "rb") as handle:
        values = [
            [a.get(key, 0) for key in keys] for a in ijson.items(handle, "annotations.item", use_float=True)
        ]
    columns = dict(zip(keys, zip(*values)))
    del values
    image_id = np.array(columns["image_id"], np.int64)
    image_row = order[np.searchsorted(ids, image_id, sorter=order)]
    np.savez(
        dest, image_row=image_row, image_id=image_id, ann_id=np.array(columns["id"], np.int64),
        category_id=np.array(columns["category_id"], np.int64), bbox=np.array(columns["bbox"], np.float64),
        iscrowd=np.array(columns["iscrowd"], np.int8), widths=widths, heights=heights,
    )  # fmt: skip
    return {"annotations": len(image_id), "images": len(ids), "file_mb": path.stat().st_size / MB}


def link_first_images(path: Path, folder: Path, count: int) -> dict:
    """Hard links named as the first `count` image records, to JPEGs of their recorded sizes."""
    import ijson

    sizes = folder / "_sizes"
    sizes.mkdir(parents=True, exist_ok=True)
    with open(path, "rb") as handle:
        for record in itertools.islice(ijson.items(handle, "images.item"), count):
            source = sizes / f"{record['width']}x{record['height']}.jpg"
            write_jpeg(source, record["width"], record["height"])
            target = folder / record["file_name"]
            if not target.exists():
                os.link(source, target)
    return {"linked_images": count}


# ----------------------------------------------------------------------------- synthesizing OUT


def synthesize_out(arrays: Path, out: Path, seed: int = 0) -> dict:
    """OUT/rows/part-*.parquet with one row per annotation: parts of IMAGES_PER_PART images in
    file order, rows sorted by ann_index within a part."""
    import pyarrow.parquet as pq

    data = dict(np.load(arrays))
    rng = np.random.default_rng(seed)
    counts = tiny_box_counts(data["widths"], data["heights"])
    part_of = data["image_row"] // IMAGES_PER_PART
    order = np.argsort(part_of, kind="stable")  # stable: ann_index order within each part
    bounds = np.searchsorted(part_of[order], np.unique(part_of), side="left").tolist() + [len(order)]
    rows = out / "rows"
    if rows.exists():
        shutil.rmtree(rows)
    rows.mkdir(parents=True)
    for number, (start, stop) in enumerate(itertools.pairwise(bounds)):
        table = refined_table(data, order[start:stop], counts, rng)
        pq.write_table(table, rows / f"part-{number:06d}.parquet")
    return {"parts": len(bounds) - 1, "rows_mb": sum(p.stat().st_size for p in rows.iterdir()) / MB}


def tiny_box_counts(widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """Per image, the compressed RLE counts of a 2x2 mask in its top left corner at its size."""
    from pycocotools import mask as mask_utils

    sizes, inverse = np.unique(np.stack([heights, widths], axis=1), axis=0, return_inverse=True)
    texts = []
    for height, width in sizes.tolist():
        mask = np.zeros((height, width), np.uint8, order="F")
        mask[:2, :2] = 1
        texts.append(mask_utils.encode(mask)["counts"].decode())
    return np.array(texts, dtype=object)[inverse.reshape(-1)]


def refined_table(data: dict, picked: np.ndarray, counts: np.ndarray, rng: np.random.Generator):
    """REFINED_ANNOTATION rows of the annotations at positions `picked` (ok, or crowd_skipped)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from hqsam.schemas.refined import REFINED_ANNOTATION, RLE

    n, row = len(picked), data["image_row"][picked]
    crowd = data["iscrowd"][picked].astype(bool)
    skipped = pa.array(crowd)
    width, height = data["widths"][row], data["heights"][row]
    box = data["bbox"][picked].astype(np.float64)
    prompt = np.concatenate([box[:, :2], box[:, :2] + box[:, 2:]], axis=1)
    image_id = pa.array(data["image_id"][picked])
    file_name = pc.binary_join_element_wise(pc.cast(image_id, pa.string()), ".jpg", "")
    size = lists(np.stack([height, width], axis=1), pa.int32())
    segmentation = pa.StructArray.from_arrays(
        [size, pa.array(counts[row], pa.string())], fields=list(RLE), mask=skipped
    )
    scores = [pa.array(rng.uniform(0.5, 1.0, n), pa.float32(), mask=crowd) for _ in range(3)]
    columns = {
        "image_id": image_id,
        "image_uri": pc.binary_join_element_wise("/data/images/", file_name, ""),
        "file_name": file_name,
        "width": pa.array(width, pa.int64()),
        "height": pa.array(height, pa.int64()),
        "annotation_id": pa.array(data["ann_id"][picked]),
        "ann_index": pa.array(picked.astype(np.int64)),
        "category_id": pa.array(data["category_id"][picked], pa.int64()),
        "iscrowd": pa.array(crowd.astype(np.int64)),
        "prompt_box": lists(prompt, pa.float64()),
        "bbox": lists(np.tile([0.0, 0.0, 2.0, 2.0], (n, 1)), pa.float64(), mask=skipped),
        "area": pa.array(np.full(n, 4), pa.int64(), mask=crowd),
        "segmentation": segmentation,
        "score": scores[0],
        "iou_vs_original": scores[1],
        "boundary_iou_vs_original": scores[2],
        "prompt": pa.array(np.full(n, "box"), pa.string()),
        "stability": scores[0],
        "sam_hq_iou": scores[1],
        "accepted": pa.array(np.ones(n, bool), mask=crowd),
        "rejected_by": pa.nulls(n, pa.string()),
        "status": pa.array(np.where(crowd, "crowd_skipped", "ok"), pa.string()),
        "error": pa.nulls(n, pa.string()),
        "model": pa.array(np.full(n, MODEL_LABEL), pa.string()),
    }
    return pa.Table.from_arrays([columns[f.name] for f in REFINED_ANNOTATION], schema=REFINED_ANNOTATION)


def lists(values: np.ndarray, value_type, mask=None):
    """A list array of the rows of a 2-D array (each row one list), null where `mask` is true."""
    import pyarrow as pa

    n, width = values.shape
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), value_type), mask=mask)


# ----------------------------------------------------------------------------- measuring (children)


class _FirstBatch(BaseException):  # noqa: N818  (not an Exception: refine_run's handlers let it through)
    """Raised in the driver once the first refined batch has arrived: stops the run."""


class _NoBatchInTime(BaseException):  # noqa: N818
    """Raised by SIGALRM when no refined batch has arrived within the child's timeout."""


class _Phases(logging.Handler):
    """hqsam's log lines, with the seconds since `start` at which they were written."""

    def __init__(self, start: float) -> None:
        super().__init__(logging.INFO)
        self.start, self.lines = start, []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append([round(time.perf_counter() - self.start, 3), record.getMessage()[:200]])


def first_batch(spec: dict) -> dict:
    """Start a refine run of spec["file"] and stop it at its first refined batch; times and memory."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = time.perf_counter()
    import ray

    from hqsam.pipeline import progress
    from hqsam.pipeline.refine_pipeline import RefineSettings
    from hqsam.pipeline.refine_run import RefineConfig, run_refine

    imported = time.perf_counter()
    marks: dict = {"imports_s": imported - started}
    phases = _Phases(imported)
    logging.getLogger("hqsam").addHandler(phases)
    logging.getLogger("hqsam").setLevel(logging.INFO)
    ray_init = ray.init

    def timed_init(*args, **kwargs):
        before = time.perf_counter()
        try:
            return ray_init(*args, **kwargs)
        finally:
            marks["ray_init_at_s"], marks["ray_init_s"] = before - imported, time.perf_counter() - before

    advance = progress.ProgressReporter.advance

    def stop_at_first(reporter, done=0, *, work=None, **updates):
        if reporter.label != "refine":  # the input's reading bar
            return advance(reporter, done, work=work, **updates)
        marks["first_batch_s"] = time.perf_counter() - imported
        marks["first_batch_rows"], marks["first_batch_images"] = done, work
        raise _FirstBatch

    ray.init, progress.ProgressReporter.advance = timed_init, stop_at_first
    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(spec["timeout_s"])
    settings = RefineSettings(
        "vit_tiny", "random", None, "cpu", batch_size=REFINE_BATCH, images_per_file=REFINE_BATCH
    )
    config = RefineConfig(
        spec["file"], spec["out"], images=spec.get("images"), format="parquet", settings=settings
    )
    try:
        run_refine(config, progress=False)
        raise RuntimeError("the run ended without a refined batch")
    except _FirstBatch:
        signal.alarm(0)
    except _NoBatchInTime:
        marks |= {"first_batch_s": None, "timed_out_after_s": spec["timeout_s"]}
    if marks["first_batch_s"] is not None:  # a user's `hqsam refine` pays the imports too
        marks["from_start_s"] = marks["first_batch_s"] + marks["imports_s"]
    result = {**marks, **peaks(), "phases": phases.lines}
    ray.shutdown()
    return result


def give_up(signum, frame) -> None:
    raise _NoBatchInTime


def coco_write(spec: dict) -> dict:
    """write_coco(spec["file"], spec["out"]): time and memory; annotations.json removed after."""
    from hqsam.pipeline.write_coco import write_coco

    started = time.perf_counter()
    uri = write_coco(spec["file"], spec["out"])
    seconds = time.perf_counter() - started
    path = Path(uri)
    with open(path, "rb") as handle:
        handle.seek(-3, os.SEEK_END)
        complete = handle.read().rstrip().endswith(b"]}")
    result = {"coco_write_s": seconds, **peaks(), "output_mb": path.stat().st_size / MB, "complete": complete}
    path.unlink()
    return result


def peaks() -> dict:
    return {
        "peak_rss_mb": status_kb("VmHWM") / 1024,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


CHILD_TASKS = {
    "objects365": lambda s: generate_objects365(Path(s["file"]), s["annotations"], s["seed"]),
    "arrays": lambda s: coco_arrays(Path(s["file"]), Path(s["arrays"])),
    "link": lambda s: link_first_images(Path(s["file"]), Path(s["images"]), s["count"]),
    "out": lambda s: synthesize_out(Path(s["arrays"]), Path(s["out"])),
    "first_batch": first_batch,
    "coco_write": coco_write,
}


def child(task: str, **spec) -> dict:
    """Run one step in a fresh process (its own peak RSS); its result."""
    env = os.environ | {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    return child_result(Path(__file__), ["--child", json.dumps({"task": task, **spec})], cwd=ROOT, env=env)


# ----------------------------------------------------------------------------- one file


def prepare(name: str, args: argparse.Namespace, annotations: int | None) -> dict:
    """The file of this entry (generated unless already there), its arrays and its synthesized OUT."""
    folder = args.work / name
    folder.mkdir(parents=True, exist_ok=True)
    entry: dict = {"name": name, "folder": folder}
    if annotations is None:  # the COCO-train-size file
        entry["file"] = args.coco_train or folder / "coco_train.json"
        if not entry["file"].exists():
            generate_coco_train(entry["file"], args.seed)
        entry["arrays"] = folder / "coco_train.npz"
        entry["images"] = folder / "images"
        child("link", file=str(entry["file"]), images=str(entry["images"]), count=args.linked_images)
        maker = ("arrays", {"file": str(entry["file"]), "arrays": str(entry["arrays"])})
    else:
        entry["file"] = folder / f"objects365_{annotations}.json"
        entry["arrays"] = arrays_path(entry["file"])
        spec = {"file": str(entry["file"]), "annotations": annotations, "seed": args.seed}
        maker = ("objects365", spec)
    info_path = folder / "file.json"
    made_from = json.loads(info_path.read_text()).get("source") if info_path.exists() else None
    if args.regenerate or made_from != str(entry["file"]) or not entry["arrays"].exists():
        started = time.perf_counter()
        info = child(maker[0], **maker[1]) | {"prepare_s": time.perf_counter() - started}
        info["source"] = str(entry["file"])
        info |= child("out", arrays=str(entry["arrays"]), out=str(folder / "out"))
        info_path.write_text(json.dumps(info))
    entry["info"] = json.loads(info_path.read_text())
    print(f"{name}: {entry['file']} {entry['info']}", flush=True)
    return entry


def generate_coco_train(path: Path, seed: int) -> None:
    """benchmarks/manifest.py's COCO-train-size file, generated in a child (its memory stays there)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path;"
        "from benchmarks.manifest import ANNOTATIONS, IMAGES, generate;"
        "generate(Path(sys.argv[2]), images=IMAGES, annotations=ANNOTATIONS, seed=int(sys.argv[3]))"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", code, str(ROOT), str(path), str(seed)], check=True)


def measure(entry: dict, repeats: int, timeout_s: int, kinds: list[str]) -> dict:
    """Median times and largest peaks over `repeats` fresh children of each kind in `kinds`."""
    folder, runs = entry["folder"], {"first_batch": [], "coco_write": []}
    for _ in range(repeats):
        refine_out = folder / "refine_out"
        shutil.rmtree(refine_out, ignore_errors=True)
        images = str(entry["images"]) if "images" in entry else None
        spec = {"file": str(entry["file"]), "out": str(refine_out), "images": images, "timeout_s": timeout_s}
        if "first_batch" in kinds:
            runs["first_batch"].append(child("first_batch", **spec) | {"load_1min_after": os.getloadavg()[0]})
        shutil.rmtree(refine_out, ignore_errors=True)
        if "coco_write" in kinds:
            runs["coco_write"].append(child("coco_write", file=str(entry["file"]), out=str(folder / "out")))
    first = runs["first_batch"] or [{"first_batch_s": None, "peak_rss_mb": None}]
    write = runs["coco_write"] or [{"coco_write_s": None, "peak_rss_mb": None}]
    row = {
        "name": entry["name"],
        "annotations": entry["info"]["annotations"],
        "images": entry["info"]["images"],
        "file_mb": entry["info"]["file_mb"],
        # the input streamed, Ray started and the dataset running: what issue 14's "start to first
        # batch" (read_manifest + ray.init + dataset, 21.6 s before) measured; excludes imports
        "pipeline_ready_s": median_or_none([ready_at(r) for r in first]),
        "first_batch_s": median_or_none([r["first_batch_s"] for r in first]),
        "first_batch_from_start_s": median_or_none([r.get("from_start_s") for r in first]),
        "first_batch_peak_rss_mb": max_or_none([r["peak_rss_mb"] for r in first]),
        "coco_write_s": median_or_none([r["coco_write_s"] for r in write]),
        "coco_write_peak_rss_mb": max_or_none([r["peak_rss_mb"] for r in write]),
    }
    print(f"  {row}", flush=True)
    return {**row, "file": entry["info"], "runs": runs}


def ready_at(run: dict) -> float | None:
    """When the run logged how many images it will refine (after the stream and Ray's start)."""
    return next((at for at, line in run.get("phases", []) if "images to refine" in line), None)


def max_or_none(values: list) -> float | None:
    return None if None in values else max(values)


def median_or_none(values: list) -> float | None:
    """The median, or None when any run timed out."""
    return None if None in values else statistics.median(values)


# ----------------------------------------------------------------------------- checks and report


def checks(rows: list[dict]) -> dict:
    """Issue 14's targets on the rows measured (the smallest and largest generated sizes stand
    for 1M and 10M)."""
    result: dict = {}
    generated = sorted((r for r in rows if r["name"] != "coco_train"), key=lambda r: r["annotations"])
    if generated:
        small, large = generated[0], generated[-1]
        size_ratio = large["annotations"] / small["annotations"]
        for kind in ("first_batch", "coco_write"):
            peak = large[f"{kind}_peak_rss_mb"]
            if peak is None:  # not measured in this run (--kinds)
                continue
            result[f"{kind}_rss_at_largest_le_{RSS_LIMIT_MB}_mb"] = peak <= RSS_LIMIT_MB
            result[f"{kind}_rss_within_{RSS_SPREAD_MB}_mb_of_smallest"] = (
                peak - small[f"{kind}_peak_rss_mb"] <= RSS_SPREAD_MB
            )
            for key in (f"{kind}_s", "pipeline_ready_s") if kind == "first_batch" else (f"{kind}_s",):
                times = large[key], small[key]
                result[f"{key}_growth_at_most_linear"] = None not in times and (
                    times[0] / times[1] <= size_ratio * GROWTH_SLACK
                )
    for row in rows:
        if row["name"] == "coco_train":
            seconds, megabytes = COCO_TRAIN_LIMITS
            result[f"coco_train_pipeline_ready_le_{seconds:.0f}_s"] = (
                row["pipeline_ready_s"] or math.inf
            ) <= seconds
            result[f"coco_train_first_refined_rows_le_{seconds:.0f}_s"] = (
                row["first_batch_s"] or math.inf
            ) <= seconds
            result[f"coco_train_first_batch_rss_le_{megabytes}_mb"] = (
                row["first_batch_peak_rss_mb"] or math.inf
            ) <= megabytes
    return result


def print_table(rows: list[dict], verdicts: dict) -> None:
    header = (
        "file",
        "annotations",
        "images",
        "file MB",
        "ready s",
        "first batch s",
        "peak MB",
        "coco write s",
        "peak MB",
    )
    print("\n" + " | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        cells = (
            r["name"], f"{r['annotations']:,}", f"{r['images']:,}", f"{r['file_mb']:.0f}",
            number(r["pipeline_ready_s"], 1), seconds_or_timeout(r["first_batch_s"]),
            number(r["first_batch_peak_rss_mb"], 0),
            number(r["coco_write_s"], 1), number(r["coco_write_peak_rss_mb"], 0),
        )  # fmt: skip
        print(" | ".join(cells))
    for name, passed in verdicts.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")


def number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def seconds_or_timeout(seconds: float | None) -> str:
    return "timeout" if seconds is None else f"{seconds:.1f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=list(SIZES), help="annotations per generated file"
    )
    parser.add_argument(
        "--coco-train", type=Path, default=None, help="the COCO-train-size file (else generated)"
    )
    parser.add_argument("--no-coco-train", action="store_true", help="skip the COCO-train-size file")
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=["first_batch", "coco_write"],
        default=["first_batch", "coco_write"],
        help="which measurements to run",
    )
    parser.add_argument("--linked-images", type=int, default=2048, help="COCO-train images given a JPEG")
    parser.add_argument(
        "--work", type=Path, default=Path("/work/data/scale"), help="generated files and OUTs"
    )
    parser.add_argument("--regenerate", action="store_true", help="write the files again even when there")
    parser.add_argument("--repeats", type=int, default=1, help="fresh children per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--first-batch-timeout", type=int, default=900, help="seconds a run may take to its first batch"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "scale_cpu.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(CHILD_TASKS[spec.pop("task")](spec)), flush=True)
        return {}
    started, at_start = time.perf_counter(), machine()
    entries = [(f"objects365_{n}", n) for n in args.sizes]
    if not args.no_coco_train:
        entries.append(("coco_train", None))
    rows = [
        measure(prepare(name, args, n), args.repeats, args.first_batch_timeout, args.kinds)
        for name, n in entries
    ]
    verdicts = checks(rows)
    print_table(rows, verdicts)
    result = {
        "benchmark": "driver peak RSS and time: start -> first refined batch, and write_coco, per file size",
        "machine": at_start,
        "settings": {"model": "vit_tiny", "checkpoint": "random", "device": "cpu", "refine_batch": REFINE_BATCH,
                     "images_per_part": IMAGES_PER_PART, "repeats": args.repeats, "seed": args.seed},
        "rows": rows,
        "checks": verdicts,
        "benchmark_wall_s": time.perf_counter() - started,
        "load_average_at_end": list(os.getloadavg()),
    }  # fmt: skip
    write_result(args.json, result)
    return result


if __name__ == "__main__":
    main()
