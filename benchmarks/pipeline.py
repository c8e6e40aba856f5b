"""Benchmark: the Ray refinement pipeline against a bare BoxRefiner loop, on the same cores.

The same small synthetic images (320x240 JPEGs with a few drawn shapes; a COCO file with ~3 boxes
and polygons per image, written under --workdir, a temp dir by default) go through:

  bare    one process, no Ray: read + hqsam_core.images.decode_image, BoxRefiner.refine on batches
          of --batch-size images, hqsam_core.masks.encode_rles of the masks. What the pipeline does,
          minus Ray (and minus the pipeline's extra columns and Parquet).
  stages  one process, no Ray: the pipeline's own chain (refine_pipeline.refine_stages: ReadImages,
          DecodeImages, RefineMasks, EncodeMasks, WriteParquetParts) through pipeline.stage.run_local,
          the same stages Ray runs: the bare work plus the pipeline's extra work (IoU/boundary IoU
          vs the input polygons, Parquet).
  points  as stages, with --prompt box+points (K=1 round, P=2 points, T=3 trials): the cost of
          mask-guided prompts relative to the box alone (--points; the polygons are the originals)
  ray     pipeline.refine_run.run_refine with a RefineConfig on a local Ray (ray.init(num_cpus=2)), CPU,
          RefineSettings.torch_threads = the bare loop's thread count, a random-weights vit_tiny
          checkpoint this script writes (build_hqsam + hqsam_core.random_weights.randomize_ + save_model).

Each repeat runs bare, stages and ray in fresh subprocesses, interleaved so that drift in the load
of this shared machine hits all alike; medians are reported. The ray subprocess times:
  cold    ray.init + run_refine(N images): everything a user waits for.
  warm    run_refine(N) again on the running Ray: includes the job's fixed costs (manifest,
          checkpoint checks, a new actor process and its model load, Ray Data start-up).
  fixed   run_refine on 1 image whose annotation is a crowd region (nothing to refine): those
          fixed costs alone.
  steady  N / (warm - fixed): throughput with the fixed costs taken out.
The bare loop's timing excludes its one model load (reported apart). Every contestant keeps freed
memory in its process (hqsam_core.allocator, as the pipeline's CPU refine actors do).

Then driver memory: run_refine over --memory-images (200 and 2000) tiny 64x48 images in fresh
subprocesses, peak RSS of the driver (ru_maxrss). The encoder costs the same for any image size
(it resizes to 1024), so to keep this under a few minutes only every --memory-refined-every'th
image has refinable boxes; the others are crowd regions that still flow through every stage
(read, decode, the refine actor, encode, Parquet). The driver never holds masks or pixels.

    .venv/bin/python benchmarks/pipeline.py --json benchmarks/results/pipeline_cpu_vit_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import child_result, machine, status_kb, write_result  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

VARIANT = "vit_tiny"
TARGET_RATIO = 0.85


# ----------------------------------------------------------------------------- inputs


def write_dataset(
    root: Path, images: int, *, size=(320, 240), shapes=(2, 4), refined_every: int = 1, seed: int = 0
) -> dict:
    """JPEGs with drawn shapes and a COCO file (bbox + polygon per shape) under `root`.

    Only every `refined_every`-th image (the last of each run of that many) gets refinable boxes;
    the others get crowd annotations only.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    width, height = size
    (root / "images").mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]}
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(images):
        base = np.stack([(xx * rng.uniform(0.2, 0.8)) % 256, (yy * rng.uniform(0.2, 0.8)) % 256, 0 * xx], -1)
        noise = rng.normal(0, 12, size=(height, width, 3))
        image = Image.fromarray(np.clip(base + noise + 60, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(shapes[0], shapes[1] + 1))):
            w, h = rng.uniform(0.15, 0.45) * width, rng.uniform(0.15, 0.45) * height
            x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
            color = tuple(int(c) for c in rng.integers(0, 256, size=3))
            if rng.random() < 0.5:
                angle = np.linspace(0, 2 * np.pi, 24, endpoint=False)
                xs, ys = x0 + w / 2 * (1 + np.cos(angle)), y0 + h / 2 * (1 + np.sin(angle))
                draw.ellipse([x0, y0, x0 + w, y0 + h], fill=color)
            else:
                xs, ys = np.array([x0, x0 + w, x0 + w, x0]), np.array([y0, y0, y0 + h, y0 + h])
                draw.rectangle([x0, y0, x0 + w, y0 + h], fill=color)
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": i,
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)],
                    "area": round(w * h, 2),
                    "segmentation": [np.stack([xs, ys], 1).reshape(-1).round(2).tolist()],
                    "iscrowd": 0 if (i + 1) % refined_every == 0 else 1,
                }
            )
        name = f"{i:06d}.jpg"
        image.save(root / "images" / name, quality=90)
        coco["images"].append({"id": i, "file_name": f"images/{name}", "width": width, "height": height})
    (root / "annotations.json").write_text(json.dumps(coco))
    refinable = sum(1 for a in coco["annotations"] if not a["iscrowd"])
    return {"images": images, "annotations": len(coco["annotations"]), "refinable_annotations": refinable}


def write_checkpoint(path: Path, seed: int = 1234) -> None:
    from hqsam.hqsam_core import build_hqsam, save_model
    from hqsam.hqsam_core.testing.random_weights import randomize_

    save_model(randomize_(build_hqsam(VARIANT), seed=seed), str(path))


# ----------------------------------------------------------------------------- contestants (children)


def child_bare(spec: dict) -> dict:
    """decode -> BoxRefiner.refine (batches) -> encode_rles, no Ray; model load timed apart."""
    import torch

    from hqsam.hqsam_core import BoxRefiner, build_hqsam
    from hqsam.hqsam_core.allocator import retain_freed_memory
    from hqsam.hqsam_core.images import decode_image
    from hqsam.hqsam_core.masks import bbox_xywh_to_xyxy, encode_rles

    torch.set_num_threads(spec["threads"])
    retain_freed_memory()  # what the pipeline's CPU refine actors do: compare like with like
    t = time.perf_counter()
    refiner = BoxRefiner(build_hqsam(VARIANT, spec["checkpoint"]), "cpu")
    load_s = time.perf_counter() - t
    coco = json.loads(Path(spec["annotations"]).read_text())
    by_image: dict[int, list] = {}
    for annotation in coco["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    items = [(image, by_image.get(image["id"], [])) for image in coco["images"]]
    root = Path(spec["annotations"]).parent

    started, cpu = time.perf_counter(), time.process_time()
    masks_out = 0
    for start in range(0, len(items), spec["batch_size"]):
        chunk = items[start : start + spec["batch_size"]]
        pixels, boxes = [], []
        for image, image_annotations in chunk:
            data = (root / image["file_name"]).read_bytes()
            pixels.append(decode_image(data, (image["height"], image["width"])))
            refinable = [a for a in image_annotations if not a["iscrowd"]]
            boxes.append(
                np.array([bbox_xywh_to_xyxy(a["bbox"]) for a in refinable], np.float32).reshape(-1, 4)
            )
        for result in refiner.refine(pixels, boxes):
            if len(result.masks):
                masks_out += len(encode_rles(result.masks))
    return {
        "seconds": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu,
        "model_load_s": load_s,
        "masks": masks_out,
    }


def child_points(spec: dict) -> dict:
    """child_stages with box+points prompts: K=1, P=2, T=3."""
    return child_stages(spec | {"prompt": "box+points"})


def child_stages(spec: dict) -> dict:
    """The pipeline's chain of stages through run_local, in this process, no Ray."""
    from hqsam.pipeline.manifest import read_manifest
    from hqsam.pipeline.refine_pipeline import RefineSettings, refine_stages
    from hqsam.pipeline.stage import run_local

    settings = RefineSettings(
        VARIANT,
        spec["checkpoint"],
        None,
        "cpu",
        batch_size=spec["batch_size"],
        torch_threads=spec["threads"],
        prompt=spec.get("prompt", "box"),
        prompt_rounds=1,
        prompt_points=2,
        prompt_trials=3,
    )
    out = tempfile.mkdtemp(prefix="hqsam-bench-stages-", dir=spec["workdir"])
    stages = refine_stages(out, settings)
    t = time.perf_counter()
    for stage in stages:
        stage.setup()  # the model load, timed apart (run_local's own setup calls find it built)
    load_s = time.perf_counter() - t

    started, cpu = time.perf_counter(), time.process_time()
    rows = read_manifest(spec["annotations"]).tasks.to_pylist()
    annotations = sum(len(row["statuses"]) for row in run_local(rows, stages))
    return {
        "seconds": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu,
        "model_load_s": load_s,
        "annotations": annotations,
    }


def child_ray(spec: dict) -> dict:
    """ray.init, then run_refine cold, warm, and on a 1-image crowd-only dataset (fixed costs)."""
    import ray

    from hqsam.pipeline.refine_pipeline import RefineSettings
    from hqsam.pipeline.refine_run import RefineConfig, run_refine

    settings = RefineSettings(
        VARIANT, spec["checkpoint"], None, "cpu", batch_size=spec["batch_size"], torch_threads=spec["threads"]
    )

    cpu: dict[str, float] = {}
    meter = TreeCpu()

    def run(name: str, annotations: str) -> tuple[float, dict]:
        out = tempfile.mkdtemp(prefix="hqsam-bench-ray-", dir=spec["workdir"])
        t, mark = time.perf_counter(), meter.mark()
        summary = run_refine(RefineConfig(annotations, out, settings=settings), progress=False)
        seconds = time.perf_counter() - t
        time.sleep(1.0)  # let the sampler see the actor's last ticks if it is still exiting
        cpu[name] = meter.since(mark)
        return seconds, summary

    t, mark = time.perf_counter(), meter.mark()
    _ray_init(ray)
    init_s, cpu["ray_init"] = time.perf_counter() - t, meter.since(mark)
    cold_s, summary = run("cold_run_refine", spec["annotations"])
    warm_s, warm_summary = run("warm", spec["annotations"])
    fixed_s, _ = run("fixed", spec["fixed_annotations"])
    ray.shutdown()
    return {
        "ray_init_s": init_s,
        "cold_run_refine_s": cold_s,
        "cold_s": init_s + cold_s,
        "warm_s": warm_s,
        "fixed_s": fixed_s,
        "steady_s": max(warm_s - fixed_s, 1e-9),
        "cpu_s": {**cpu, "steady": cpu["warm"] - cpu["fixed"]},  # all Ray processes + driver
        "annotations_ok": summary["annotations_ok"],
        "errors": summary["errors"],
        "warm_annotations_ok": warm_summary["annotations_ok"],
        "peak_driver_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def child_memory(spec: dict) -> dict:
    """ray.init + run_refine over one dataset; the driver's peak and final RSS."""
    import ray

    from hqsam.pipeline.refine_pipeline import RefineSettings
    from hqsam.pipeline.refine_run import RefineConfig, run_refine

    settings = RefineSettings(
        VARIANT, spec["checkpoint"], None, "cpu", batch_size=spec["batch_size"], torch_threads=spec["threads"]
    )
    rss_start = status_kb("VmRSS") * 1024
    _ray_init(ray)
    rss_after_init = status_kb("VmRSS") * 1024
    out = tempfile.mkdtemp(prefix="hqsam-bench-mem-", dir=spec["workdir"])
    t = time.perf_counter()
    summary = run_refine(RefineConfig(spec["annotations"], out, settings=settings), progress=False)
    seconds = time.perf_counter() - t
    result = {
        "seconds": seconds,
        "annotations_total": summary["annotations_total"],
        "annotations_ok": summary["annotations_ok"],
        "errors": summary["errors"],
        "complete": summary["complete"],
        "rss_start_bytes": rss_start,
        "rss_after_ray_init_bytes": rss_after_init,
        "rss_end_bytes": status_kb("VmRSS") * 1024,
        # resident at the end by kind: anonymous (Python heap), file-backed, shared (Ray's object
        # store pages this driver has touched, e.g. by putting the source blocks)
        "rss_end_kib": {kind: status_kb(kind) for kind in ("RssAnon", "RssFile", "RssShmem")},
        "peak_driver_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    ray.shutdown()
    return result


def _ray_init(ray) -> None:
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=2**30,
        log_to_driver=False,
        configure_logging=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False


class TreeCpu:
    """CPU seconds (user + system) spent by this process and all its descendants while running.

    With ray.init in this process, that is the driver, GCS, raylet and every worker and actor.
    A sampling thread (every second) records each descendant's own CPU ticks and keeps following
    it once seen, because Ray's actor processes are re-parented and gone (with their times) by
    the time a run ends. A process's last second before it exits can be missed.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        import threading

        self.interval_s = interval_s
        self.seen: dict[int, int] = {}  # pid -> latest utime + stime ticks
        self.baseline: dict[int, int] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            self.sample()
            time.sleep(self.interval_s)

    def sample(self) -> None:
        table = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # exited meanwhile
                table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        with self.lock:
            tree, stack = set(), [os.getpid()]
            while stack:
                pid = stack.pop()
                tree.add(pid)
                stack.extend(
                    child for child, (parent, _) in table.items() if parent == pid and child not in tree
                )
            for pid in tree | self.seen.keys():
                if pid in table:
                    self.seen[pid] = max(self.seen.get(pid, 0), table[pid][1])

    def mark(self) -> dict[int, int]:
        self.sample()
        with self.lock:
            return dict(self.seen)

    def since(self, mark: dict[int, int]) -> float:
        now = self.mark()
        return sum(ticks - mark.get(pid, 0) for pid, ticks in now.items()) / os.sysconf("SC_CLK_TCK")


CHILDREN = {
    "bare": child_bare,
    "stages": child_stages,
    "points": child_points,
    "ray": child_ray,
    "memory": child_memory,
}


def run_child(kind: str, spec: dict) -> dict:
    started = time.perf_counter()
    result = child_result(Path(__file__), ["--child", kind, json.dumps(spec)])
    result["process_wall_s"] = time.perf_counter() - started
    result["load_average_1min_after"] = os.getloadavg()[0]  # other work on this shared machine
    return result


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=24, help="images for the throughput comparison")
    parser.add_argument("--batch-size", type=int, default=4, help="images per refine call (both sides)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (bare loop and refine actor)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-images", type=int, nargs="*", default=[200, 2000])
    parser.add_argument("--memory-refined-every", type=int, default=100)
    parser.add_argument("--skip-stages", action="store_true", help="leave out the no-Ray stages run")
    parser.add_argument("--points", action="store_true", help="also the stages with box+points prompts")
    parser.add_argument("--skip-ray", action="store_true", help="leave out the Ray runs (and memory)")
    parser.add_argument("--workdir", type=Path, default=None, help="generated data (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, spec = args.child
        print("RESULT " + json.dumps(CHILDREN[kind](json.loads(spec))), flush=True)
        return {}
    if args.images < 1 or args.repeats < 1 or args.batch_size < 1:
        parser.error("--images, --repeats and --batch-size must be at least 1")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hqsam-bench-pipeline-") as temp:
        work = args.workdir or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = work / "hqsam_vit_tiny_random.pth"
        write_checkpoint(checkpoint)
        data = write_dataset(work / "throughput", args.images, seed=args.seed)
        write_dataset(work / "fixed", 1, shapes=(1, 1), refined_every=2, seed=args.seed)
        spec = {
            "checkpoint": str(checkpoint),
            "annotations": str(work / "throughput" / "annotations.json"),
            "fixed_annotations": str(work / "fixed" / "annotations.json"),
            "batch_size": args.batch_size,
            "threads": args.threads,
            "workdir": str(work),
        }
        print(
            f"{args.images} images 320x240, {data['annotations']} boxes; {args.repeats} repeats", flush=True
        )
        kinds = ["bare"] + ([] if args.skip_stages else ["stages"]) + (["points"] if args.points else [])
        kinds += [] if args.skip_ray else ["ray"]
        runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for repeat in range(args.repeats):
            for kind in kinds:
                runs[kind].append(run_child(kind, spec))
                print(f"  {kind} run {repeat + 1}: {_brief(kind, runs[kind][-1])}", flush=True)

        counts = [] if args.skip_ray else args.memory_images
        memory = [_measure_memory(args, work, spec, count) for count in counts]

    result = summarize(args, data, runs, memory)
    result["benchmark_wall_s"] = time.perf_counter() - started
    print_table(result)
    write_result(args.json, result)
    return result


def _measure_memory(args, work: Path, spec: dict, count: int) -> dict:
    """run_refine over `count` tiny images in a fresh subprocess: the driver's memory."""
    root = work / f"memory_{count}"
    info = write_dataset(root, count, size=(64, 48), refined_every=args.memory_refined_every, seed=args.seed)
    result = run_child("memory", {**spec, "annotations": str(root / "annotations.json")})
    print(
        f"  memory {count} images: peak driver RSS {result['peak_driver_rss_bytes'] / 2**20:.0f} MiB, "
        f"{result['seconds']:.0f} s",
        flush=True,
    )
    return {"images": count, **info, **result}


def _brief(kind: str, r: dict) -> str:
    if kind == "ray":
        return f"cold {r['cold_s']:.1f} s, warm {r['warm_s']:.1f} s, fixed {r['fixed_s']:.1f} s"
    return f"{r['seconds']:.1f} s (model load {r['model_load_s']:.1f} s)"


def summarize(args, data: dict, runs: dict, memory: list) -> dict:
    images, boxes = data["images"], data["refinable_annotations"]

    def rate(seconds: float) -> dict:
        return {"seconds": seconds, "images_per_s": images / seconds, "annotations_per_s": boxes / seconds}

    medians = {}
    for kind in ("bare", "stages", "points"):
        if runs.get(kind):
            medians[kind] = rate(statistics.median(r["seconds"] for r in runs[kind]))
    cpu_per_image = {
        kind: statistics.median(r["cpu_s"] for r in runs[kind]) / images
        for kind in ("bare", "stages", "points")
        if runs.get(kind)
    }
    if runs.get("ray"):
        for key in ("cold_s", "warm_s", "steady_s"):
            medians[f"ray_{key[:-2]}"] = rate(statistics.median(r[key] for r in runs["ray"]))
        for key in ("steady", "warm", "fixed"):
            cpu_per_image[f"ray_{key}"] = statistics.median(r["cpu_s"][key] for r in runs["ray"]) / images
        medians["ray_fixed_s"] = statistics.median(r["fixed_s"] for r in runs["ray"])
        medians["ray_init_s"] = statistics.median(r["ray_init_s"] for r in runs["ray"])
    medians["cpu_s_per_image"] = cpu_per_image  # ray_fixed: per image of the N, for comparison
    bare = medians["bare"]["seconds"]
    ratios = {
        f"{name}_over_bare": bare / medians[name]["seconds"]
        for name in ("ray_steady", "ray_warm", "ray_cold", "stages")
        if name in medians
    }
    if "points" in medians and "stages" in medians:  # how many times the box's time box+points takes
        ratios["points_cost_over_box"] = medians["points"]["seconds"] / medians["stages"]["seconds"]
    peaks = {m["images"]: m["peak_driver_rss_bytes"] for m in memory}
    return {
        "benchmark": "pipeline.refine_run.run_refine (Ray Data) vs a bare BoxRefiner loop, CPU, vit_tiny random weights",
        "machine": machine(),
        "versions": _versions(),
        "params": {
            "images": images,
            "image_size_wh": [320, 240],
            "annotations": data["annotations"],
            "refinable_annotations": boxes,
            "batch_size": args.batch_size,
            "torch_threads": args.threads,
            "repeats": args.repeats,
            "ray_init": "num_cpus=2, include_dashboard=False, object_store_memory=1 GiB",
            "memory_images": args.memory_images,
            "memory_refined_every": args.memory_refined_every,
        },
        "runs": runs,
        "median": medians,
        "ratios": ratios,
        "target_ratio": TARGET_RATIO,
        "meets_target_steady": ratios.get("ray_steady_over_bare", 0) >= TARGET_RATIO
        if runs.get("ray")
        else None,
        "memory": memory,
        "memory_peak_growth_bytes": (max(peaks.values()) - min(peaks.values())) if len(peaks) > 1 else None,
    }


def _versions() -> dict:
    import pyarrow
    import ray
    import torch

    return {"ray": ray.__version__, "torch": torch.__version__, "pyarrow": pyarrow.__version__}


def print_table(r: dict) -> None:
    p, m = r["params"], r["median"]
    print(
        f"\n{p['images']} images 320x240, {p['refinable_annotations']} boxes, batch {p['batch_size']}, "
        f"{p['torch_threads']} torch threads; {r['machine']['cpu_model']}, {r['machine']['cores']} cores; "
        f"median of {p['repeats']}"
    )
    print(f"{'':44} {'seconds':>8} {'img/s':>7} {'ann/s':>7} {'vs bare':>8}")
    names = [
        ("bare", "bare loop (decode, refine, RLE)"),
        ("stages", "pipeline stages, no Ray"),
        ("points", "pipeline stages, box+points K=1 P=2 T=3"),
        ("ray_steady", "Ray pipeline, fixed costs taken out"),
        ("ray_warm", "Ray pipeline, warm (actor + model load)"),
        ("ray_cold", "Ray pipeline, cold (+ ray.init)"),
    ]
    for key, label in names:
        if key not in m:
            continue
        ratio = m["bare"]["seconds"] / m[key]["seconds"]
        s = m[key]
        print(
            f"{label:44} {s['seconds']:8.1f} {s['images_per_s']:7.2f} {s['annotations_per_s']:7.2f} {ratio:8.2f}"
        )
    if "points_cost_over_box" in r["ratios"]:
        print(f"box+points (K=1, P=2, T=3) takes {r['ratios']['points_cost_over_box']:.2f}x the box's time")
    if "ray_fixed_s" in m:
        print(
            f"fixed costs of one run_refine (1 crowd-only image): {m['ray_fixed_s']:.1f} s; "
            f"ray.init: {m['ray_init_s']:.1f} s"
        )
        print(
            f"ratio pipeline/bare (steady) {r['ratios']['ray_steady_over_bare']:.2f}, target >= {r['target_ratio']}"
        )
    c = m["cpu_s_per_image"]
    print(
        "CPU seconds per image (all processes; insensitive to other load): "
        + ", ".join(f"{k} {v:.2f}" for k, v in c.items())
    )
    if r["memory"]:
        print(
            f"\n{'driver memory':14} {'images':>7} {'boxes':>8} {'seconds':>8} {'peak RSS MiB':>13} {'end RSS MiB':>12}"
        )
        for mem in r["memory"]:
            print(
                f"{'':14} {mem['images']:7d} {mem['refinable_annotations']:8d} {mem['seconds']:8.1f} "
                f"{mem['peak_driver_rss_bytes'] / 2**20:13.0f} {mem['rss_end_bytes'] / 2**20:12.0f}"
            )
        if r["memory_peak_growth_bytes"] is not None:
            print(f"peak RSS growth, largest vs smallest: {r['memory_peak_growth_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
