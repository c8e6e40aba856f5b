"""Benchmark (issue 15): can the CPUs feed the GPU? CPU-ms per image of every stage but the model.

COCO-sized JPEGs (640x480, 480x640, 640x427, 500x375), 7 annotations each with polygon masks, sized
as COCO's objects are (about 41% small, 34% medium, 24% large), go through the pipeline's own stages
in this process, one core (torch and the stages single-threaded), timed in CPU time:

  read     ReadImages: the image file's bytes (local disk here; object storage costs more waiting,
           not more CPU)
  decode   DecodeImages' JPEG decode and validation (hqsam_core.images.decode_image at the recorded size)
  prompts  DecodeImages' prompt building: one box prompt or status per annotation
  refine   NOT TIMED: the model's work. A stand-in writes each annotation's own mask, dilated by 2
           pixels, as its refined mask, packed as RefineMasks hands them on
  rle      EncodeMasks' unpacking and RLE encoding, with box and area of each mask
  compare  EncodeMasks' IoU and boundary IoU against each annotation's original mask (decoding the
           polygons included)
  judge    JudgeRows: the acceptance policy (the default, iou_vs_original >= 0.5)
  write    WriteParquetParts: the rows as zstd Parquet

From the total: the images/s one core feeds, and the cores a node needs per GPU at the GPU targets
of issue 7 (vit_h bf16 60 img/s and vit_b 250 img/s on an H100), against what a g5.xlarge (4 vCPU,
one A10G) and a p5.48xlarge (192 vCPU for 8 H100: 24 per GPU) offer.

    .venv/bin/python benchmarks/stage_costs.py --json benchmarks/results/stage_costs_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_result  # noqa: E402

COCO_SIZES = [(640, 480), (480, 640), (640, 427), (500, 375)]  # W x H
# COCO's share of small (< 32^2 px), medium and large (> 96^2) objects, and the sides drawn for each.
OBJECT_SIZES = [(0.41, (8, 32)), (0.34, (32, 96)), (0.25, (96, 360))]
GPU_TARGETS = {"vit_h bf16 (H100)": 60.0, "vit_b bf16 (H100)": 250.0}
NODES = {"g5.xlarge (4 vCPU per GPU)": 4, "p5.48xlarge (24 vCPU per GPU)": 24}
STAGES = ("read", "decode", "prompts", "rle", "compare", "judge", "write")


def write_dataset(root: Path, images: int, boxes: int, seed: int) -> Path:
    """COCO-sized JPEGs with `boxes` drawn polygons each (COCO's object sizes); the COCO file's path."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i in range(images):
        width, height = COCO_SIZES[i % len(COCO_SIZES)]
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.stack([(xx * rng.uniform(0.2, 0.8)) % 256, (yy * rng.uniform(0.2, 0.8)) % 256, 0 * xx], -1)
        image = Image.fromarray(
            np.clip(base + rng.normal(0, 12, (height, width, 3)) + 60, 0, 255).astype(np.uint8)
        )
        draw = ImageDraw.Draw(image)
        for _ in range(boxes):
            share = rng.random()
            low, high = next(sides for cumulative, sides in _cumulative(OBJECT_SIZES) if share <= cumulative)
            w, h = (min(rng.uniform(low, high), width - 2), min(rng.uniform(low, high), height - 2))
            x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
            angle = np.sort(rng.uniform(0, 2 * np.pi, 16))
            radius = rng.uniform(0.6, 1.0, 16)
            xs = x0 + w / 2 * (1 + radius * np.cos(angle))
            ys = y0 + h / 2 * (1 + radius * np.sin(angle))
            polygon = np.stack([xs, ys], 1).round(2)
            draw.polygon([tuple(p) for p in polygon], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": i,
                    "category_id": 1,
                    "bbox": [round(float(xs.min()), 2), round(float(ys.min()), 2),
                             round(float(np.ptp(xs)), 2), round(float(np.ptp(ys)), 2)],
                    "area": round(w * h, 2),
                    "segmentation": [polygon.reshape(-1).tolist()],
                    "iscrowd": 0,
                }
            )  # fmt: skip
        name = f"{i:06d}.jpg"
        image.save(root / "images" / name, quality=90)
        coco["images"].append({"id": i, "file_name": f"images/{name}", "width": width, "height": height})
    path = root / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def _cumulative(sizes):
    total = 0.0
    for share, sides in sizes:
        total += share
        yield total, sides


def stand_in_refine(rows: list[dict]) -> list[dict]:
    """What RefineMasks hands on, without the model: each pending annotation's own mask dilated by
    2 pixels, bit-packed, status ok."""
    import orjson

    from hqsam.hqsam_core.masks import segmentation_to_mask
    from hqsam.hqsam_core.refiner import pack_masks
    from hqsam.schemas.status import Status

    for row in rows:
        height, width = int(row["height"]), int(row["width"])
        pending = [k for k, s in enumerate(row["statuses"]) if s == Status.PENDING]
        masks = np.zeros((len(pending), height, width), bool)
        for position, k in enumerate(pending):
            original = segmentation_to_mask(orjson.loads(row["segmentations"][k]), height, width)
            masks[position] = _dilated(original, 2)
        row["statuses"] = [Status.OK if s == Status.PENDING else s for s in row["statuses"]]
        row["packed_masks"] = pack_masks(masks)
        row["scores"] = [0.9] * len(row["statuses"])
        row["stabilities"] = np.full(len(row["statuses"]), 0.95, np.float32)
        row["sam_hq_ious"] = np.full(len(row["statuses"]), 0.9, np.float32)
        row["prompt_kinds"] = ["box"] * len(row["statuses"])
        del row["pixels"]
    return rows


def _dilated(mask: np.ndarray, pixels: int) -> np.ndarray:
    """`mask` grown by `pixels` (a square neighbourhood)."""
    padded = np.pad(mask, pixels)
    height, width = mask.shape
    grown = np.zeros_like(mask)
    for dy in range(2 * pixels + 1):
        for dx in range(2 * pixels + 1):
            grown |= padded[dy : dy + height, dx : dx + width]
    return grown


def measure(annotations: Path, out: Path, repeats: int) -> dict:
    """CPU seconds of each stage over all images, the best of `repeats` passes."""
    import copy

    import torch

    from hqsam.hqsam_core.acceptance import DEFAULT_POLICY
    from hqsam.hqsam_core.images import decode_image
    from hqsam.pipeline.decode_images import DecodeImages
    from hqsam.pipeline.encode_masks import EncodeMasks
    from hqsam.pipeline.judge_rows import JudgeRows
    from hqsam.pipeline.manifest import read_manifest
    from hqsam.pipeline.read_images import ReadImages
    from hqsam.pipeline.write_parquet import WriteParquetParts

    torch.set_num_threads(1)
    tasks = read_manifest(str(annotations)).tasks.to_pylist()
    best: dict[str, float] = {}
    for repeat in range(repeats):
        seconds: dict[str, float] = {}
        rows = _timed(seconds, "read", ReadImages().process, copy.deepcopy(tasks))
        _timed(
            seconds,
            "decode",
            lambda rs: [decode_image(r["image_bytes"], (r["height"], r["width"])) for r in rs],
            rows,
        )
        rows = DecodeImages().process(rows)
        # DecodeImages' own prompt building, apart from its decode (timed above)
        _timed(seconds, "prompts", _build_prompts, rows)
        rows = stand_in_refine(rows)
        rows = _timed(seconds, "encode_masks", EncodeMasks().process, rows)
        rle_only = [
            dict(r, segmentations=[""] * len(r["segmentations"])) for r in stand_in_refine(_decoded(tasks))
        ]
        _timed(seconds, "rle", EncodeMasks().process, rle_only)
        seconds["compare"] = seconds.pop("encode_masks") - seconds["rle"]
        rows = _timed(seconds, "judge", JudgeRows(DEFAULT_POLICY).process, rows)
        writer = WriteParquetParts(str(out / f"pass-{repeat}"), "vit_h", 512)
        _timed(seconds, "write", writer.process, rows)
        best = {k: min(v, best.get(k, v)) for k, v in seconds.items()}
    return best


def _build_prompts(rows: list[dict]) -> list:
    from hqsam.pipeline.decode_images import DecodeImages

    prompt = DecodeImages()._prompt
    return [prompt(row, k) for row in rows for k in range(len(row["bboxes"]))]


def _decoded(tasks: list[dict]) -> list[dict]:
    import copy

    from hqsam.pipeline.decode_images import DecodeImages
    from hqsam.pipeline.read_images import ReadImages

    return DecodeImages().process(ReadImages().process(copy.deepcopy(tasks)))


def _timed(seconds: dict, name: str, fn, rows):
    started = time.process_time()
    result = fn(rows)
    seconds[name] = time.process_time() - started
    return result


def summarize(seconds: dict[str, float], images: int, annotations: int) -> dict:
    per_image_ms = {stage: 1000 * seconds[stage] / images for stage in STAGES}
    total_ms = sum(per_image_ms.values())
    feeds = 1000 / total_ms
    return {
        "cpu_ms_per_image": {k: round(v, 2) for k, v in per_image_ms.items()},
        "cpu_ms_per_image_total": round(total_ms, 2),
        "images_per_s_per_core": round(feeds, 1),
        "cores_needed": {
            target: {
                "images_per_s": rate,
                "cores": round(rate / feeds, 2),
                **{node: rate / feeds <= cores for node, cores in NODES.items()},
            }
            for target, rate in GPU_TARGETS.items()
        },
        "images": images,
        "annotations": annotations,
    }


def print_table(result: dict) -> None:
    print(f"\n{result['images']} COCO-sized images, {result['annotations']} annotations, one core")
    print("| stage | CPU-ms / image |\n|---|---|")
    for stage, ms in result["cpu_ms_per_image"].items():
        print(f"| {stage} | {ms:.2f} |")
    print(f"| **all but the model** | **{result['cpu_ms_per_image_total']:.2f}** |")
    print(f"\none core feeds {result['images_per_s_per_core']} images/s")
    for target, need in result["cores_needed"].items():
        fits = ", ".join(f"{node}: {'fits' if need[node] else 'SHORT'}" for node in NODES)
        print(f"{target}: {need['images_per_s']:.0f} img/s needs {need['cores']} cores ({fits})")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--boxes", type=int, default=7, help="annotations per image (7: the COCO average)")
    parser.add_argument("--repeats", type=int, default=3, help="passes; the best of each stage is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hqsam-stage-costs-") as temp:
        annotations = write_dataset(Path(temp) / "data", args.images, args.boxes, args.seed)
        seconds = measure(annotations, Path(temp) / "out", args.repeats)
    result = {
        "benchmark": "CPU cost per image of every stage but the model (issue 15)",
        "machine": machine(),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        **summarize(seconds, args.images, args.images * args.boxes),
    }
    print_table(result)
    write_result(args.json, result)
    return result


if __name__ == "__main__":
    main()
