"""Benchmark: memory of refining one image as its box count grows (issue 12, item 9).

One decoded image row (--size, random pixels, one box and polygon per annotation) goes through
RefineMasks + EncodeMasks with pipeline.stage.run_local, CPU, a random-weights vit_tiny, for each of
--boxes (e.g. 32 and 512) in a fresh process. Each process reports:

  peak_rss_growth   the kernel's peak resident set (VmHWM, reset through /proc/self/clear_refs
                    once the model is loaded and the row is built) minus the resident set then:
                    every allocation, numpy's, torch's and pycocotools' alike.
  tracemalloc_peak  the peak of allocations tracemalloc sees during the run: Python objects and
                    numpy arrays (numpy reports to it), not torch's CPU tensors.

What must grow with the box count is only the output: each mask bit-packed (H*W/8 bytes) plus its
RLE. Everything else (full-size masks, 256x256 logits) should stay that of one decoder chunk
(max_prompts boxes) or one encode group. The table gives the growth small -> large per added box,
next to the size of one packed and one full-size mask.

--base REV runs the same children on an older commit as well (benchmarks/revisions.py's checkout)
so both are recorded side by side.

    .venv/bin/python benchmarks/memory.py --base HEAD --json benchmarks/results/memory_cpu_vit_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import child_result, machine, status_kb, write_result  # noqa: E402


def decoded_row(boxes: int, size: tuple[int, int], seed: int = 0) -> dict:
    """An IMAGE_DECODED row: random pixels, `boxes` pending boxes, each with its box as polygon."""
    rng = np.random.default_rng(seed)
    height, width = size
    x0, y0 = rng.uniform(0, width * 0.7, boxes), rng.uniform(0, height * 0.7, boxes)
    x1 = x0 + rng.uniform(16, width * 0.3, boxes)
    y1 = y0 + rng.uniform(16, height * 0.3, boxes)
    prompts = np.stack([x0, y0, x1, y1], axis=1).round(1)
    polygons = [json.dumps([[a, b, c, b, c, d, a, d]]) for a, b, c, d in prompts.tolist()]
    return {
        "image_id": 1,
        "image_uri": "memory.jpg",
        "file_name": "memory.jpg",
        "width": width,
        "height": height,
        "ann_ids": list(range(boxes)),
        "ann_indices": list(range(boxes)),
        "category_ids": [1] * boxes,
        "bboxes": [[a, b, c - a, d - b] for a, b, c, d in prompts.tolist()],
        "iscrowd": [0] * boxes,
        "segmentations": polygons,
        "pixels": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        "prompts": prompts,
        "statuses": ["pending"] * boxes,
        "errors": [""] * boxes,
    }


def child(spec: dict) -> dict:
    """Refine + encode one row of spec["boxes"] boxes; the memory it took."""
    import torch

    from hqsam.pipeline.encode_masks import EncodeMasks
    from hqsam.pipeline.refine_masks import RefineMasks
    from hqsam.pipeline.refine_pipeline import RefineSettings
    from hqsam.pipeline.stage import run_local

    settings = RefineSettings("vit_tiny", spec["checkpoint"], None, "cpu", torch_threads=spec["threads"])
    stages = [RefineMasks(settings), EncodeMasks()]
    for stage in stages:
        stage.setup()
    torch.set_num_threads(spec["threads"])
    row = decoded_row(spec["boxes"], tuple(spec["size"]))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
    rss_before = status_kb("VmRSS") * 1024
    tracemalloc.start()
    started = time.perf_counter()
    (out,) = run_local([row], stages)
    seconds = time.perf_counter() - started
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "boxes": spec["boxes"],
        "ok": sum(1 for area in out["areas"] if area >= 0),
        "seconds": seconds,
        "rss_before_bytes": rss_before,
        "peak_rss_growth_bytes": status_kb("VmHWM") * 1024 - rss_before,
        "tracemalloc_peak_bytes": traced_peak,
    }


def run_child(tree: Path, env: dict[str, str] | None, spec: dict) -> dict:
    return child_result(ROOT / "benchmarks" / "memory.py", ["--child", json.dumps(spec)], cwd=tree, env=env)


def measure(args: argparse.Namespace, work: Path) -> dict[str, list[dict]]:
    """Each side's children, one per box count."""
    from benchmarks.pipeline import write_checkpoint
    from benchmarks.revisions import checkout

    checkpoint = work / "hqsam_vit_tiny_random.pth"
    write_checkpoint(checkpoint)
    sides = {"working_tree": (ROOT, None)}
    if args.base:
        sides = {args.base: (work / "base" / "src", checkout(args.base, work / "base")), **sides}
    results: dict[str, list[dict]] = {}
    for side, (tree, env) in sides.items():
        results[side] = []
        for boxes in args.boxes:
            spec = {"checkpoint": str(checkpoint), "boxes": boxes, "size": args.size, "threads": args.threads}
            results[side].append(run_child(tree, env, spec))
            r = results[side][-1]
            print(
                f"  {side} {boxes} boxes: peak RSS growth {r['peak_rss_growth_bytes'] / 2**20:.0f} MiB, "
                f"tracemalloc peak {r['tracemalloc_peak_bytes'] / 2**20:.0f} MiB, {r['seconds']:.0f} s",
                flush=True,
            )
    return results


def summarize(args: argparse.Namespace, results: dict[str, list[dict]]) -> dict:
    height, width = args.size
    summary = {}
    for side, runs in results.items():
        small, large = runs[0], runs[-1]
        added = large["boxes"] - small["boxes"]
        summary[side] = {
            f"{kind}_per_added_box_bytes": (large[f"{kind}_bytes"] - small[f"{kind}_bytes"]) / added
            for kind in ("peak_rss_growth", "tracemalloc_peak")
        }
    return {
        "benchmark": "RefineMasks + EncodeMasks (run_local) on one image, CPU, vit_tiny random weights",
        "machine": machine(),
        "params": {
            "boxes": args.boxes,
            "size_hw": args.size,
            "threads": args.threads,
            "base": args.base,
            "packed_mask_bytes": -(-height * width // 8),
            "full_mask_bytes": height * width,
            "logits_bytes_per_box": 256 * 256 * 4,
        },
        "summary": summary,
        "runs": results,
    }


def print_table(result: dict) -> None:
    params = result["params"]
    print(
        f"one {params['size_hw'][0]}x{params['size_hw'][1]} image; a packed mask is "
        f"{params['packed_mask_bytes'] / 2**10:.0f} KiB, a full one {params['full_mask_bytes'] / 2**10:.0f} KiB"
    )
    for side, s in result["summary"].items():
        print(
            f"{side:>14s}: per added box, peak RSS +{s['peak_rss_growth_per_added_box_bytes'] / 2**10:.0f} KiB, "
            f"tracemalloc peak +{s['tracemalloc_peak_per_added_box_bytes'] / 2**10:.0f} KiB"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--boxes", type=int, nargs="+", default=[32, 512], help="box counts, small to large")
    parser.add_argument("--size", type=int, nargs=2, default=[768, 1024], metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base", default=None, help="also measure this older commit (e.g. HEAD)")
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return {}
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hqsam-bench-memory-") as temp:
        result = summarize(args, measure(args, Path(temp)))
    result["benchmark_wall_s"] = time.perf_counter() - started
    print_table(result)
    write_result(args.json, result)
    return result


if __name__ == "__main__":
    main()
