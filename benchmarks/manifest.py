"""Benchmark: a COCO instances file of COCO-train size becoming pipeline input.

Generates a COCO-like instances file (118,287 images, ~860,000 annotations, ~7.3 per image,
polygons with COCO-like vertex counts, ~1% iscrowd annotations with uncompressed RLE, 80
categories, info and licenses; ~450 MB like instances_train2017.json), then measures, in a fresh
subprocess per repeat (so peak RSS is that of a driver doing only this):

    stream_coco(path, staging)                 -> the task folder (pipeline/stream_coco.py)
    ray.init(num_cpus=2, ...)                  -> a local Ray, object store 2 GiB
    build_refine_dataset(task_dataset(...))    -> the lazy source (one block per part) and stages

and the subprocess's peak RSS (VmHWM: ru_maxrss of a child starts at its parent's peak on Linux).
Spec targets (issue 4, section 2): the file becomes pipeline input within 60 s and 6 GB of driver
memory. (Before issue 14 this measured read_manifest and ray.data.from_arrow: 21.6 s, 5.26 GB by
ru_maxrss, which may include the generating parent's peak.)

    .venv/bin/python benchmarks/manifest.py --json benchmarks/results/manifest_coco_train_size.json

The generated file goes to a temporary directory (removed afterwards) unless --path is given;
with --path and an existing file, --reuse measures that file without regenerating it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, status_kb, write_result  # noqa: E402

IMAGES = 118_287
ANNOTATIONS = 860_001
EMPTY_IMAGES = 1_021  # COCO train2017 images without annotations
CROWD_SHARE = 0.0105  # 9,071 of 860,001 in COCO train2017
TARGET_MB = (60.0, 6.0)  # seconds, GB

COCO_CATEGORIES = [
    # (id, name, supercategory): the 80 COCO categories with their sparse ids
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"), (5, "airplane", "vehicle"), (6, "bus", "vehicle"),
    (7, "train", "vehicle"), (8, "truck", "vehicle"), (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"), (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"), (15, "bench", "outdoor"), (16, "bird", "animal"),
    (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"), (20, "sheep", "animal"),
    (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"), (24, "zebra", "animal"),
    (25, "giraffe", "animal"), (27, "backpack", "accessory"), (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"), (32, "tie", "accessory"), (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"), (41, "skateboard", "sports"), (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"), (44, "bottle", "kitchen"), (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"), (50, "spoon", "kitchen"),
    (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"), (54, "sandwich", "food"),
    (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"), (58, "hot dog", "food"),
    (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"), (62, "chair", "furniture"),
    (63, "couch", "furniture"), (64, "potted plant", "furniture"), (65, "bed", "furniture"),
    (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"),
    (73, "laptop", "electronic"), (74, "mouse", "electronic"), (75, "remote", "electronic"),
    (76, "keyboard", "electronic"), (77, "cell phone", "electronic"), (78, "microwave", "appliance"),
    (79, "oven", "appliance"), (80, "toaster", "appliance"), (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"), (84, "book", "indoor"), (85, "clock", "indoor"),
    (86, "vase", "indoor"), (87, "scissors", "indoor"), (88, "teddy bear", "indoor"),
    (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
]  # fmt: skip


# ----------------------------------------------------------------------------- generating the file


HEAD = {  # the file's info and licenses, as COCO's
    "info": {
        "description": "hqsam benchmark: COCO-train-sized synthetic instances",
        "url": "https://example.invalid/hqsam",
        "version": "1.0",
        "year": 2017,
        "contributor": "benchmarks/manifest.py",
        "date_created": "2017/09/01",
    },
    "licenses": [
        {"url": f"http://creativecommons.org/licenses/{i}/2.0/", "id": i, "name": f"License {i}"}
        for i in range(1, 9)
    ],
}


def generate(path: Path, *, images: int, annotations: int, seed: int, chunk: int = 20_000) -> dict:
    """Write a COCO-like instances file to `path`, streaming; returns its vital statistics."""
    rng = np.random.default_rng(seed)
    image_ids = np.sort(rng.choice(600_000, size=images, replace=False)).astype(np.int64)
    landscape = rng.random(images) < 0.7
    short = rng.integers(333, 641, size=images)
    widths = np.where(landscape, 640, short)
    heights = np.where(landscape, short, 640)
    per_image = _annotations_per_image(rng, images, annotations)
    owner = rng.permutation(np.repeat(np.arange(images), per_image))  # COCO's order is by category
    crowd = rng.random(annotations) < CROWD_SHARE
    categories = np.array([c[0] for c in COCO_CATEGORIES])
    category_of = categories[rng.integers(0, len(categories), size=annotations)]

    with open(path, "wb") as out:
        out.write(orjson.dumps(HEAD)[:-1] + b',"images":[')
        for start in range(0, images, chunk):
            stop = min(start + chunk, images)
            records = [_image_record(i, int(image_ids[i]), heights[i], widths[i]) for i in range(start, stop)]
            out.write((b"," if start else b"") + orjson.dumps(records)[1:-1])
        out.write(b'],"annotations":[')
        vertices = 0
        for start in range(0, annotations, chunk):
            stop = min(start + chunk, annotations)
            records, count = _annotation_chunk(
                rng, start, owner[start:stop], crowd[start:stop], category_of[start:stop],
                image_ids, heights, widths,
            )  # fmt: skip
            vertices += count
            out.write(
                (b"," if start else b"") + orjson.dumps(records, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]
            )
        out.write(b'],"categories":')
        out.write(orjson.dumps([{"supercategory": s, "id": i, "name": n} for i, n, s in COCO_CATEGORIES]))
        out.write(b"}")
    return {
        "bytes": path.stat().st_size,
        "images": images,
        "images_with_annotations": int((per_image > 0).sum()),
        "annotations": annotations,
        "crowd_annotations": int(crowd.sum()),
        "polygon_vertices_mean": vertices / max(1, annotations - int(crowd.sum())),
        "annotations_per_image_max": int(per_image.max()),
    }


def _image_record(i: int, image_id: int, height: int, width: int) -> dict:
    """A COCO train2017-like image record."""
    return {
        "license": 1 + image_id % 8,
        "file_name": f"{image_id:012d}.jpg",
        "coco_url": f"http://images.cocodataset.org/train2017/{image_id:012d}.jpg",
        "height": int(height),
        "width": int(width),
        "date_captured": "2013-11-14 11:18:45",
        "flickr_url": f"http://farm4.staticflickr.com/{i % 9000}/{image_id}_0a1b2c3d4e_z.jpg",
        "id": image_id,
    }


def _annotations_per_image(rng: np.random.Generator, images: int, annotations: int) -> np.ndarray:
    """Counts per image: 0 for EMPTY_IMAGES images, else 1 + geometric, summing exactly to `annotations`."""
    empty = min(EMPTY_IMAGES, max(0, images - 1))
    counts = np.zeros(images, np.int64)
    with_annotations = rng.permutation(images)[: images - empty]
    mean_extra = annotations / len(with_annotations) - 1
    counts[with_annotations] = 1 + rng.geometric(1 / (1 + mean_extra), size=len(with_annotations)) - 1
    difference = annotations - int(counts.sum())
    while difference:
        pick = rng.choice(with_annotations, size=min(abs(difference), len(with_annotations)), replace=False)
        if difference > 0:
            counts[pick] += 1
        else:
            pick = pick[counts[pick] > 1]
            counts[pick] -= 1
        difference = annotations - int(counts.sum())
    return counts


def _annotation_chunk(rng, first_id, owner, crowd, category_of, image_ids, heights, widths):
    """COCO annotation dicts for one chunk: polygons (numpy, rounded to 0.01 px) or crowd RLEs."""
    n = len(owner)
    h, w = heights[owner].astype(np.float64), widths[owner].astype(np.float64)
    # object size: COCO has many small objects and a long tail of large ones
    scale = np.clip(rng.lognormal(np.log(0.12), 0.8, size=n), 0.01, 0.95)
    rx, ry = scale * w / 2, scale * h / 2
    cx, cy = rng.uniform(rx, w - rx), rng.uniform(ry, h - ry)
    parts = np.where(rng.random(n) < 0.9, 1, rng.integers(2, 5, size=n))
    records, total_vertices = [], 0
    for k in range(n):
        image = int(owner[k])
        annotation = {
            "segmentation": None,
            "area": 0.0,
            "iscrowd": int(crowd[k]),
            "image_id": int(image_ids[image]),
            "bbox": None,
            "category_id": int(category_of[k]),
            "id": int(first_id + k + 1),
        }
        if crowd[k]:
            rle, box, area = _crowd_rle(
                rng, int(heights[image]), int(widths[image]), cx[k], cy[k], rx[k], ry[k]
            )
            annotation["segmentation"], annotation["bbox"], annotation["area"] = rle, box, area
        else:
            polygons, xs_all, ys_all, area = [], [], [], 0.0
            for _ in range(int(parts[k])):
                count = int(np.clip(rng.lognormal(np.log(13 + 38 * scale[k]), 0.5), 3, 400))
                total_vertices += count
                angle = np.sort(rng.uniform(0, 2 * np.pi, size=count))
                radius = rng.uniform(0.55, 1.0, size=count)
                xs = np.clip(cx[k] + rx[k] * radius * np.cos(angle), 0, w[k]).round(2)
                ys = np.clip(cy[k] + ry[k] * radius * np.sin(angle), 0, h[k]).round(2)
                polygons.append(np.stack([xs, ys], axis=1).reshape(-1))
                xs_all.append(xs)
                ys_all.append(ys)
                area += 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))
            xs, ys = np.concatenate(xs_all), np.concatenate(ys_all)
            x0, y0 = float(xs.min()), float(ys.min())
            annotation["segmentation"] = polygons
            annotation["bbox"] = [x0, y0, round(float(xs.max()) - x0, 2), round(float(ys.max()) - y0, 2)]
            annotation["area"] = area
        records.append(annotation)
    return records, total_vertices


def _crowd_rle(rng, height, width, cx, cy, rx, ry):
    """An uncompressed column-major COCO RLE of a ragged blob, as COCO stores crowd regions."""
    x0, x1 = max(0, int(cx - rx)), min(width, int(cx + rx) + 1)
    top = np.clip(cy - ry * rng.uniform(0.6, 1.0, size=x1 - x0), 0, height - 1).astype(np.int64)
    bottom = np.clip(cy + ry * rng.uniform(0.6, 1.0, size=x1 - x0), top + 1, height).astype(np.int64)
    counts = np.empty(2 * (x1 - x0) + 1, np.int64)
    # zeros before each column's run: rest of the previous column plus this column's top
    counts[0] = x0 * height + top[0]
    counts[2:-1:2] = (height - bottom[:-1]) + top[1:]
    counts[1::2] = bottom - top
    counts[-1] = (height - bottom[-1]) + (width - x1) * height
    box = [float(x0), float(top.min()), float(x1 - x0), float(bottom.max() - top.min())]
    return {"counts": counts, "size": [height, width]}, box, int((bottom - top).sum())


# ----------------------------------------------------------------------------- measuring (subprocess)


def measure(path: str) -> dict:
    """In this (fresh) process: read the manifest, start Ray, build the dataset; times and memory."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    marks: dict[str, float] = {}
    rss: dict[str, int] = {}
    t0 = time.perf_counter()
    import ray

    from hqsam.pipeline.refine_pipeline import RefineSettings, build_refine_dataset
    from hqsam.pipeline.stream_coco import stream_coco
    from hqsam.pipeline.task_source import task_dataset

    marks["import_s"] = time.perf_counter() - t0
    rss["after_import"] = status_kb("VmRSS")

    load_start = os.getloadavg()[0]
    t, cpu = time.perf_counter(), time.process_time()
    staging = tempfile.TemporaryDirectory(prefix="hqsam-manifest-tasks-")
    tasks = stream_coco(path, staging.name)
    marks["read_manifest_s"] = time.perf_counter() - t
    marks["read_manifest_cpu_s"] = time.process_time() - cpu
    rss["after_read_manifest"] = status_kb("VmRSS")
    rss["peak_after_read_manifest"] = status_kb("VmHWM")

    t = time.perf_counter()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=2 * 2**30,
        log_to_driver=False,
        configure_logging=False,
    )
    marks["ray_init_s"] = time.perf_counter() - t

    t, cpu = time.perf_counter(), time.process_time()
    settings = RefineSettings("vit_tiny", "sam_hq_vit_tiny", None, "cpu")
    with tempfile.TemporaryDirectory(prefix="hqsam-manifest-bench-") as out:
        dataset = build_refine_dataset(task_dataset(tasks), out, settings)
    marks["build_dataset_s"] = time.perf_counter() - t
    marks["build_dataset_driver_cpu_s"] = time.process_time() - cpu
    marks["read_to_dataset_s"] = marks["read_manifest_s"] + marks["ray_init_s"] + marks["build_dataset_s"]
    marks["total_s"] = time.perf_counter() - t0
    rss["after_dataset"] = status_kb("VmRSS")
    rss["shmem_after_dataset"] = status_kb("RssShmem")
    del dataset
    result = {
        **marks,
        "task_rows": tasks.rows,
        "annotations_total": tasks.annotations,
        "dataset_blocks": len(tasks.parts),
        "peak_rss_bytes": status_kb("VmHWM") * 1024,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_kib": rss,
        "load_average_1min": [load_start, os.getloadavg()[0]],  # at read_manifest start and at the end
    }
    ray.shutdown()
    staging.cleanup()
    return result


def run_measurement(path: Path) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from benchmarks.manifest import measure;"
        "print('RESULT ' + json.dumps(measure(sys.argv[2])))"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"measurement failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["subprocess_wall_s"] = wall
    return result


# ----------------------------------------------------------------------------- main


def versions() -> dict:
    import pyarrow
    import ray

    return {"ray": ray.__version__, "pyarrow": pyarrow.__version__, "orjson": orjson.__version__}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--path", type=Path, default=None, help="write the COCO file here (default: a temp dir)"
    )
    parser.add_argument("--reuse", action="store_true", help="with --path: measure an existing file as is")
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--annotations", type=int, default=ANNOTATIONS)
    parser.add_argument("--repeats", type=int, default=3, help="fresh measurement subprocesses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = parser.parse_args(argv)
    if args.images < 1 or args.annotations < 1 or args.repeats < 1:
        parser.error("--images, --annotations and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hqsam-manifest-") as temp:
        path = args.path or Path(temp) / "instances_train_synthetic.json"
        generated = coco_file(args, path)
        print(f"COCO file {path}: {generated['bytes'] / 1e6:.1f} MB {generated}", flush=True)
        runs = []
        for repeat in range(args.repeats):
            run = run_measurement(path)
            runs.append(run)
            print(
                f"  run {repeat + 1}: read {run['read_manifest_s']:.1f} s, to dataset "
                f"{run['read_to_dataset_s']:.1f} s, peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB",
                flush=True,
            )
    result = summarize(generated, runs)
    print_table(result)
    write_result(args.json, result)
    return result


def coco_file(args: argparse.Namespace, path: Path) -> dict:
    """The COCO file at `path`: generated, or with --reuse the one already there."""
    if args.reuse and path.exists():
        return {"bytes": path.stat().st_size, "reused": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    generated = generate(path, images=args.images, annotations=args.annotations, seed=args.seed)
    generated["generate_s"] = time.perf_counter() - started
    return generated


def summarize(generated: dict, runs: list[dict]) -> dict:
    keys = (
        "import_s",
        "read_manifest_s",
        "read_manifest_cpu_s",
        "ray_init_s",
        "build_dataset_s",
        "read_to_dataset_s",
        "total_s",
    )
    median = {key: statistics.median(run[key] for run in runs) for key in (*keys, "peak_rss_bytes")}
    return {
        "benchmark": "COCO-train-sized instances file -> stream_coco (task folder) -> Ray dataset (build_refine_dataset)",
        "machine": machine(),
        "versions": versions(),
        "file": generated,
        "targets": {"read_to_dataset_s": TARGET_MB[0], "peak_rss_gb": TARGET_MB[1]},
        "runs": runs,
        "median": median,
        "meets_targets": median["read_to_dataset_s"] <= TARGET_MB[0]
        and median["peak_rss_bytes"] <= TARGET_MB[1] * 1e9,
    }


def print_table(r: dict) -> None:
    f, t, m = r["file"], r["targets"], r["median"]
    first = r["runs"][0]
    print(
        f"\n{f['bytes'] / 1e6:.0f} MB COCO file, {first['task_rows']:,} task rows, "
        f"{first['annotations_total']:,} annotations, {first['dataset_blocks']:,} dataset blocks; "
        f"{r['machine']['cpu_model']}, {r['machine']['cores']} cores, {r['machine']['ram_gib']} GiB RAM; "
        f"median of {len(r['runs'])} fresh processes"
    )
    rows = [
        ("import ray + pipeline", "import_s", ""),
        ("stream_coco (task folder)", "read_manifest_s", ""),
        ("  of which CPU time of the driver", "read_manifest_cpu_s", ""),
        ("ray.init (num_cpus=2, 2 GiB store)", "ray_init_s", ""),
        ("dataset creation (lazy)", "build_dataset_s", ""),
        ("read -> dataset (excl. imports)", "read_to_dataset_s", f"target <= {t['read_to_dataset_s']:.0f} s"),
        ("whole driver (incl. imports)", "total_s", ""),
    ]
    for name, key, note in rows:
        print(f"{name:38} {m[key]:8.1f} s  {note}")
    print(
        f"{'peak driver RSS (VmHWM)':38} {m['peak_rss_bytes'] / 1e9:8.2f} GB  target <= {t['peak_rss_gb']:.0f} GB"
    )
    print(f"meets targets: {r['meets_targets']}")


if __name__ == "__main__":
    main()
