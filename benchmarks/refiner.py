"""Benchmark: our batched BoxRefiner against the official HQ-SAM predictor loop, in one process.

Both run on the same synthetic images, the same boxes and the same random weights. The official
loop is what a user writes: per image `set_image`, then `predict_torch` on all its boxes, masks
moved to CPU numpy. Ours is `BoxRefiner.refine` over batches of `--batch-size` images.

    .venv/bin/python benchmarks/refiner.py --model vit_tiny --device cpu --images 4 --boxes 8 \
        --json benchmarks/results/refiner_cpu_vit_tiny.json

Timings are wall-clock seconds of a whole pass over all images; one warm-up pass of each runs
first, then `--repeats` passes of each, interleaved (official, ours, official, ours, ...) so
that drift in machine speed hits both alike. Reported: the median and the min of the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hqsam_core import BoxRefiner, EncodedImages, build_hqsam  # noqa: E402

# (H, W) of typical COCO images, cycled over the images.
COCO_SIZES = [(480, 640), (640, 480), (375, 500), (427, 640)]


# ----------------------------------------------------------------------------- inputs and weights


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights (the rule of tests/conftest.py, without pytest), added to the default init.

    Deterministic only if the global torch RNG was seeded before the model was built.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator) * 0.02
            if name.endswith("running_var"):
                tensor.copy_(1.0 + noise.abs())
            else:
                tensor.add_(noise)
    return model


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured HxWx3 uint8 RGB image: gradient, blocky noise, fine noise and a few solid shapes."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b = rng.uniform(-0.3, 0.3, size=2)
        image[..., c] = 128 + a * (xx - width / 2) + b * (yy - height / 2)
    block = int(rng.integers(6, 20))
    coarse = rng.normal(0, 30, size=(height // block + 1, width // block + 1, 3)).astype(np.float32)
    image += np.kron(coarse, np.ones((block, block, 1), np.float32))[:height, :width]
    image += rng.normal(0, 8, size=image.shape).astype(np.float32)
    for _ in range(int(rng.integers(3, 7))):  # objects: discs and rectangles of a flat colour
        color = rng.uniform(0, 255, size=3).astype(np.float32)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.05, 0.25) * min(height, width)
        if rng.random() < 0.5:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r * rng.uniform(0.5, 2))
        image[inside] = color + rng.normal(0, 5, size=(int(inside.sum()), 3))
    return np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8))


def random_boxes(rng: np.random.Generator, height: int, width: int, count: int) -> np.ndarray:
    """(count, 4) float32 XYXY boxes inside the image, each at least 16 px on a side."""
    min_side = 16.0
    x0 = rng.uniform(0, width - min_side, size=count)
    y0 = rng.uniform(0, height - min_side, size=count)
    x1 = x0 + min_side + rng.uniform(0, 1, size=count) * (width - x0 - min_side)
    y1 = y0 + min_side + rng.uniform(0, 1, size=count) * (height - y0 - min_side)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def make_inputs(num_images: int, boxes_per_image: int, seed: int):
    rng = np.random.default_rng(seed)
    images, boxes = [], []
    for i in range(num_images):
        height, width = COCO_SIZES[i % len(COCO_SIZES)]
        images.append(synthetic_image(rng, height, width))
        boxes.append(random_boxes(rng, height, width, boxes_per_image))
    return images, boxes


# ----------------------------------------------------------------------------- memory and device


class PeakMemory:
    """Peak memory of a block, above what was in use when it started.

    CUDA: torch.cuda.max_memory_allocated after a reset. CPU: the peak RSS (VmHWM) after resetting
    it through /proc/self/clear_refs; where that is impossible, ru_maxrss, which cannot be reset
    and so only shows growth past the process's earlier peak (flagged in `method`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else self._cpu_method()

    @staticmethod
    def _cpu_method() -> str:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _proc_status_kb("VmHWM")
            return "VmHWM (reset via /proc/self/clear_refs)"
        except OSError:
            return "ru_maxrss (not resettable: growth past the earlier peak only)"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _proc_status_kb("VmRSS") * 1024
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> int:
        """Bytes of peak above the start."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, peak - self._base)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the two contestants


def load_official(variant: str, state: dict, device: torch.device):
    with warnings.catch_warnings():  # segment_anything_hq re-registers timm models noisily
        warnings.simplefilter("ignore")
        import segment_anything_hq
    model = segment_anything_hq.sam_model_registry[variant]()
    model.load_state_dict(state, strict=True)
    model.eval()  # TinyViT caches its attention biases at eval()
    model.to(device)
    return segment_anything_hq.SamPredictor(model)


def run_official_stages(predictor, images, boxes) -> dict[str, float]:
    stages: dict[str, float] = {}
    run_official(predictor, images, boxes, stages)
    return stages


def run_official(predictor, images, boxes, stages: dict[str, float] | None = None):
    """Returns per image (masks (N,H,W) bool, low-res logits (N,256,256), scores (N,))."""
    outputs = []
    for image, image_boxes in zip(images, boxes):
        t0 = time.perf_counter()
        predictor.set_image(image)
        synchronize(predictor.device)
        t1 = time.perf_counter()
        prompt = predictor.transform.apply_boxes_torch(
            torch.as_tensor(image_boxes, device=predictor.device), image.shape[:2]
        )
        masks, scores, logits = predictor.predict_torch(
            boxes=prompt,
            point_coords=None,
            point_labels=None,
            multimask_output=False,
            hq_token_only=False,
        )
        outputs.append((masks[:, 0].cpu().numpy(), logits[:, 0].cpu().numpy(), scores[:, 0].cpu().numpy()))
        t2 = time.perf_counter()
        if stages is not None:
            stages["set_image"] = stages.get("set_image", 0.0) + t1 - t0
            stages["predict_and_to_numpy"] = stages.get("predict_and_to_numpy", 0.0) + t2 - t1
    return outputs


def encode_in_micro_batches(refiner: BoxRefiner, images, micro_batch: int | None) -> EncodedImages:
    """`refiner.encode` on all images at once, or on `micro_batch` images at a time, concatenated.

    The micro-batched form is a prototype of a proposed BoxRefiner change (see --encode-micro-batch).
    """
    if micro_batch is None or micro_batch >= len(images):
        return refiner.encode(images)
    parts = [refiner.encode(images[i : i + micro_batch]) for i in range(0, len(images), micro_batch)]
    return EncodedImages(
        torch.cat([part.embeddings for part in parts]),
        torch.cat([part.hq_features for part in parts]),
        [size for part in parts for size in part.input_sizes],
        [size for part in parts for size in part.original_sizes],
    )


def run_ours(refiner: BoxRefiner, images, boxes, batch_size: int, micro_batch: int | None = None):
    """`refine` per batch of images, or with micro_batch, encode in micro-batches and then decode."""
    outputs = []
    for start in range(0, len(images), batch_size):
        batch_images, batch_boxes = images[start : start + batch_size], boxes[start : start + batch_size]
        if micro_batch is None:
            results = refiner.refine(batch_images, batch_boxes)
        else:
            results = refiner.decode(
                encode_in_micro_batches(refiner, batch_images, micro_batch),
                np.concatenate(batch_boxes),
                np.repeat(np.arange(len(batch_boxes)), [len(b) for b in batch_boxes]),
            )
        outputs.extend((r.masks, r.logits, r.scores) for r in results)
    return outputs


def run_ours_stages(refiner: BoxRefiner, images, boxes, batch_size: int, micro_batch: int | None = None):
    """One extra pass of ours through encode / decode (decode includes upsampling and .cpu())."""
    stages = {"encode": 0.0, "decode_and_to_numpy": 0.0}
    for start in range(0, len(images), batch_size):
        batch_images, batch_boxes = images[start : start + batch_size], boxes[start : start + batch_size]
        t0 = time.perf_counter()
        features = encode_in_micro_batches(refiner, batch_images, micro_batch)
        synchronize(refiner.device)
        t1 = time.perf_counter()
        refiner.decode(
            features,
            np.concatenate(batch_boxes),
            np.repeat(np.arange(len(batch_boxes)), [len(b) for b in batch_boxes]),
        )
        t2 = time.perf_counter()
        stages["encode"] += t1 - t0
        stages["decode_and_to_numpy"] += t2 - t1
    return stages


def agreement(official, ours) -> dict[str, float]:
    ious, logit_diff, score_diff, disagree, pixels = [], 0.0, 0.0, 0, 0
    for (m_a, l_a, s_a), (m_b, l_b, s_b) in zip(official, ours):
        assert m_a.shape == m_b.shape, (m_a.shape, m_b.shape)
        inter = (m_a & m_b).reshape(len(m_a), -1).sum(1)
        union = (m_a | m_b).reshape(len(m_a), -1).sum(1)
        ious.extend(np.where(union > 0, inter / np.maximum(union, 1), 1.0).tolist())
        logit_diff = max(logit_diff, float(np.abs(l_a - l_b).max(initial=0.0)))
        score_diff = max(score_diff, float(np.abs(s_a - s_b).max(initial=0.0)))
        disagree += int((m_a != m_b).sum())
        pixels += m_a.size
    return {
        "mean_mask_iou": float(np.mean(ious)) if ious else 1.0,
        "min_mask_iou": float(np.min(ious)) if ious else 1.0,
        "max_abs_logit_diff": logit_diff,
        "max_abs_score_diff": score_diff,
        "mask_pixel_disagreement": disagree / max(pixels, 1),
        "mean_mask_fraction": float(np.mean([m.mean() for m, _, _ in official])),
    }


# ----------------------------------------------------------------------------- the benchmark


def timed(fn: Callable[[], object], device: torch.device, memory: PeakMemory) -> tuple[dict, object]:
    """Runs fn once: wall seconds, process CPU seconds (user, sys), minor page faults, peak memory."""
    synchronize(device)
    memory.start()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    seconds = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    run = {
        "wall_s": seconds,
        "user_s": usage1.ru_utime - usage0.ru_utime,
        "sys_s": usage1.ru_stime - usage0.ru_stime,
        "minor_faults": usage1.ru_minflt - usage0.ru_minflt,
        "peak_mem_bytes": memory.stop(),
        "loadavg_1min_after": os.getloadavg()[0],
    }
    return run, out


def summarize(runs: list[dict], num_images: int, num_boxes: int) -> dict:
    seconds = [run["wall_s"] for run in runs]
    peaks = [run["peak_mem_bytes"] for run in runs]
    cpu = [run["user_s"] + run["sys_s"] for run in runs]
    median, best = statistics.median(seconds), min(seconds)
    return {
        "runs": runs,
        "seconds": seconds,
        "cpu_s_median": statistics.median(cpu),
        "sys_s_median": statistics.median(run["sys_s"] for run in runs),
        "minor_faults_median": statistics.median(run["minor_faults"] for run in runs),
        "median_s": median,
        "min_s": best,
        "images_per_s_median": num_images / median,
        "images_per_s_best": num_images / best,
        "boxes_per_s_median": num_boxes / median,
        "boxes_per_s_best": num_boxes / best,
        "peak_mem_bytes": peaks,
        "peak_mem_mib_max": max(peaks) / 2**20,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_tiny", help="vit_tiny, vit_b, vit_l or vit_h")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--boxes", type=int, default=8, help="boxes per image")
    parser.add_argument("--batch-size", type=int, default=None, help="images per refine call (default: all)")
    parser.add_argument("--max-prompts", type=int, default=64, help="BoxRefiner max_prompts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    parser.add_argument(
        "--encode-micro-batch",
        type=int,
        default=None,
        help="also time 'ours_micro': per refine batch, encode N images at a time, then one decode "
        "(a prototype of a proposed BoxRefiner change; its decoder uses --micro-max-prompts)",
    )
    parser.add_argument(
        "--micro-max-prompts",
        type=int,
        default=None,
        help="max_prompts of ours_micro (default: --max-prompts)",
    )
    args = parser.parse_args(argv)
    if args.images < 1 or args.boxes < 1 or args.repeats < 1:
        parser.error("--images, --boxes and --repeats must be at least 1")
    batch_size = args.batch_size or args.images
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")

    images, boxes = make_inputs(args.images, args.boxes, args.seed)
    num_boxes = sum(len(b) for b in boxes)
    torch.manual_seed(args.seed)  # build_hqsam's default init draws from the global RNG
    model = randomize_(build_hqsam(args.model), seed=args.seed)
    predictor = load_official(args.model, model.state_dict(), device)
    refiner = BoxRefiner(model, device, max_prompts=args.max_prompts)
    memory = PeakMemory(device)

    contestants: dict[str, Callable[[], list]] = {
        "official": lambda: run_official(predictor, images, boxes),
        "ours": lambda: run_ours(refiner, images, boxes, batch_size),
    }
    stage_runs: dict[str, Callable[[], dict]] = {
        "official": lambda: run_official_stages(predictor, images, boxes),
        "ours": lambda: run_ours_stages(refiner, images, boxes, batch_size),
    }
    micro_max_prompts = args.micro_max_prompts or args.max_prompts
    if args.encode_micro_batch is not None:
        micro = BoxRefiner(model, device, max_prompts=micro_max_prompts)
        contestants["ours_micro"] = lambda: run_ours(
            micro, images, boxes, batch_size, args.encode_micro_batch
        )
        stage_runs["ours_micro"] = lambda: run_ours_stages(
            micro, images, boxes, batch_size, args.encode_micro_batch
        )

    # warm-up, one of each; their outputs give the agreement numbers. Then the repeats, interleaved.
    loadavg_before = os.getloadavg()
    warmups, outputs = {}, {}
    for name, fn in contestants.items():
        warmups[name], outputs[name] = timed(fn, device, memory)
    runs: dict[str, list[dict]] = {name: [] for name in contestants}
    for _ in range(args.repeats):
        for name, fn in contestants.items():
            run, _ = timed(fn, device, memory)
            runs[name].append(run)
    summary = {}
    for name in contestants:
        summary[name] = summarize(runs[name], args.images, num_boxes)
        summary[name]["warmup"] = warmups[name]
        summary[name]["stages_s"] = stage_runs[name]()  # one more pass, with per-stage timings
        if name != "official":
            summary[name]["speedup_over_official_median"] = (
                summary["official"]["median_s"] / summary[name]["median_s"]
            )
            summary[name]["speedup_over_official_best"] = (
                summary["official"]["min_s"] / summary[name]["min_s"]
            )
            summary[name]["agreement"] = agreement(outputs["official"], outputs[name])

    result = {
        "benchmark": "BoxRefiner.refine vs segment_anything_hq.SamPredictor loop",
        "device": args.device,
        "device_description": device_description(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "loadavg_before": list(loadavg_before),
        "loadavg_after": list(os.getloadavg()),
        "env": {k: v for k, v in os.environ.items() if k in ENV_KEYS or k.startswith("MALLOC_")},
        "params": {
            "model": args.model,
            "images": args.images,
            "boxes_per_image": args.boxes,
            "total_boxes": num_boxes,
            "batch_size": batch_size,
            "max_prompts": args.max_prompts,
            "encode_micro_batch": args.encode_micro_batch,
            "micro_max_prompts": micro_max_prompts if args.encode_micro_batch is not None else None,
            "repeats": args.repeats,
            "seed": args.seed,
            "threads_arg": args.threads,
            "image_sizes_hw": [list(image.shape[:2]) for image in images],
        },
        "memory_method": memory.method,
        **summary,
        "speedup_ours_over_official_median": summary["ours"]["speedup_over_official_median"],
        "speedup_ours_over_official_best": summary["ours"]["speedup_over_official_best"],
        "agreement": summary["ours"]["agreement"],
    }
    print_table(result, list(contestants))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES")


def print_table(r: dict, names: list[str]) -> None:
    p = r["params"]
    micro = (
        f", ours_micro: encode {p['encode_micro_batch']} at a time, max_prompts {p['micro_max_prompts']}"
        if p["encode_micro_batch"] is not None
        else ""
    )
    print(
        f"\n{p['model']} on {r['device']} ({r['device_description']}), torch {r['torch_version']}, "
        f"{r['threads']} threads; {p['images']} images x {p['boxes_per_image']} boxes, "
        f"batch size {p['batch_size']}, max_prompts {p['max_prompts']}{micro}, {p['repeats']} repeats"
    )
    columns = [
        "median s",
        "min s",
        "img/s",
        "img/s",
        "box/s",
        "box/s",
        "peak MiB",
        "cpu s",
        "sys s",
        "x off.",
    ]
    notes = ["", "", "(med)", "(best)", "(med)", "(best)", "(max)", "(med)", "(med)", "(med)"]
    print(f"{'':11}" + "".join(f"{c:>9}" for c in columns))
    print(f"{'':11}" + "".join(f"{c:>9}" for c in notes))
    for name in names:
        s = r[name]
        values = [
            f"{s['median_s']:.3f}",
            f"{s['min_s']:.3f}",
            f"{s['images_per_s_median']:.3f}",
            f"{s['images_per_s_best']:.3f}",
            f"{s['boxes_per_s_median']:.2f}",
            f"{s['boxes_per_s_best']:.2f}",
            f"{s['peak_mem_mib_max']:.0f}",
            f"{s['cpu_s_median']:.2f}",
            f"{s['sys_s_median']:.2f}",
            f"{s.get('speedup_over_official_median', 1.0):.3f}",
        ]
        print(f"{name:11}" + "".join(f"{v:>9}" for v in values))
    print(
        f"ratio ours/official (throughput): median {r['speedup_ours_over_official_median']:.3f}, "
        f"best {r['speedup_ours_over_official_best']:.3f}"
    )
    for name in names:
        stages = ", ".join(f"{stage} {seconds:.3f}s" for stage, seconds in r[name]["stages_s"].items())
        print(f"stages of {name} (one extra pass): {stages}")
    for name in names[1:]:
        a = r[name]["agreement"]
        print(
            f"agreement {name} vs official: mean mask IoU {a['mean_mask_iou']:.6f} "
            f"(min {a['min_mask_iou']:.6f}), max |logit diff| {a['max_abs_logit_diff']:.2e}, "
            f"max |score diff| {a['max_abs_score_diff']:.2e}, pixel disagreement "
            f"{a['mask_pixel_disagreement']:.2e}, mean mask fraction {a['mean_mask_fraction']:.3f}"
        )
    print(
        f"memory: {r['memory_method']}; 1-min load average before/after: "
        f"{r['loadavg_before'][0]:.2f}/{r['loadavg_after'][0]:.2f}"
        + (f"; env {r['env']}" if r["env"] else "")
    )


if __name__ == "__main__":
    main()
