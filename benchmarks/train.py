"""Benchmark: HQ-head training throughput per worker (samples/s) and peak memory.

What one Ray Train worker does per step, in one process: `hqsam_core.training.train_step` (frozen encoder
without gradients, HQ-only logits, point-sampled BCE + dice, Adam step) on samples that went
through the official per-sample recipe (flip + large-scale jitter to 1024, one random prompt).
The recipe's CPU cost (`augment`, done in Ray Data's prefetch threads during training) is timed
apart. Random weights; generated thin-structure images.

    .venv/bin/python benchmarks/train.py --json benchmarks/results/train_cpu_vit_tiny.json
    .venv/bin/python benchmarks/train.py --device cuda --models vit_b vit_l --precisions fp32 bf16 \
        --batch-sizes 4 8 --json benchmarks/results/train_gpu.json

Anchor (REFERENCE section 3): the official trainer, ~44k x 12 samples in 4 h on 8 GPUs, is about
4.6 samples/s per GPU; the target is 3x that per GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402
from hqsam.hqsam_core import build_hqsam  # noqa: E402
from hqsam.hqsam_core.allocator import retain_freed_memory  # noqa: E402
from hqsam.hqsam_core.testing.thin_structures import generate_thin_structures  # noqa: E402
from hqsam.hqsam_core.training import (  # noqa: E402
    HQTrainingModule,
    augment,
    freeze_sam_,
    make_optimizer,
    train_step,
)

OFFICIAL_SAMPLES_PER_GPU_S = 44_320 * 12 / (4 * 3600) / 8


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(
    model_name: str, device: str, precision: str, batch_size: int, steps: int, warmup: int, seed: int
):
    torch.manual_seed(seed)
    sam = build_hqsam(model_name).to(device)  # random weights: speed does not depend on them
    params = freeze_sam_(sam)
    sam.eval()
    optimizer, _ = make_optimizer(params, 1e-3, 10)
    net = HQTrainingModule(sam)
    rng = np.random.default_rng(seed)
    data = generate_thin_structures(8, seed, size=512)
    autocast = torch.bfloat16 if precision == "bf16" else None

    augment_seconds, step_seconds, step_cpu = [], [], []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_before = peak_rss_mib()
    for step in range(warmup + steps):
        started = time.perf_counter()
        samples = [augment(*data[(step * batch_size + k) % len(data)], rng) for k in range(batch_size)]
        augmented, cpu_before = time.perf_counter(), cpu_seconds()
        values = train_step(net, sam, optimizer, samples, encoder_autocast=autocast)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        finished, cpu_after = time.perf_counter(), cpu_seconds()
        if not torch.isfinite(values).all():
            raise RuntimeError(f"non-finite loss {values.tolist()}")
        if step >= warmup:
            augment_seconds.append(augmented - started)
            step_seconds.append(finished - augmented)
            step_cpu.append(cpu_after - cpu_before)
    median_step = statistics.median(step_seconds)
    result = {
        "model": model_name,
        "device": device,
        "precision": precision,
        "batch_size": batch_size,
        "steps_timed": steps,
        "step_s_median": round(median_step, 4),
        "step_s_min": round(min(step_seconds), 4),
        "samples_per_s_per_worker": round(batch_size / median_step, 3),
        # process CPU seconds (all threads) per sample: the load-independent cost on CPU
        "step_cpu_s_per_sample": round(statistics.median(step_cpu) / batch_size, 4),
        "augment_s_per_sample": round(statistics.median(augment_seconds) / batch_size, 4),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_rss_before_mib": round(rss_before, 1),
        "trainable_params": sum(p.numel() for p in params),
    }
    if device.startswith("cuda"):
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["vs_official_per_gpu"] = round(
            result["samples_per_s_per_worker"] / OFFICIAL_SAMPLES_PER_GPU_S, 2
        )
    return result


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--models", nargs="+", default=None, help="default: vit_tiny on cpu, vit_b vit_l on cuda"
    )
    parser.add_argument("--precisions", nargs="+", default=None, help="fp32 / bf16 (default: fp32 on cpu)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[0], help="torch thread counts to try (0: torch's default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def measure_all(args: argparse.Namespace, cuda: bool) -> list[dict]:
    """`measure` for every thread count, model, precision and batch size asked, printed as it goes."""
    models = args.models or (["vit_b", "vit_l"] if cuda else ["vit_tiny"])
    precisions = args.precisions or (["fp32", "bf16"] if cuda else ["fp32"])
    default_threads = torch.get_num_threads()
    runs = []
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        for model_name in models:
            for precision in precisions:
                for batch_size in args.batch_sizes:
                    run = measure(
                        model_name, args.device, precision, batch_size, args.steps, args.warmup, args.seed
                    )
                    run["threads"] = torch.get_num_threads()
                    runs.append(run)
                    print_run(run, cuda)
    return runs


def print_run(run: dict, cuda: bool) -> None:
    memory = (
        f"peak GPU {run['peak_gpu_mib']:.0f} MiB, {run['vs_official_per_gpu']}x official"
        if cuda
        else f"peak RSS {run['peak_rss_mib']:.0f} MiB"
    )
    print(
        f"{run['model']:8s} {run['precision']:4s} batch {run['batch_size']} threads {run['threads']}: "
        f"{run['samples_per_s_per_worker']:.3f} samples/s/worker (step {run['step_s_median']:.3f} s, "
        f"{run['step_cpu_s_per_sample']:.2f} CPU s/sample, augment "
        f"{run['augment_s_per_sample']:.3f} s/sample), {memory}",
        flush=True,
    )


def main() -> None:
    args = parse_arguments()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is available")
    retained = not cuda and retain_freed_memory()  # as `hqsam train` CPU workers do
    load_before = os.getloadavg()
    runs = measure_all(args, cuda)
    report = {
        "benchmark": "HQ-head training step per worker (hqsam_core.training.train_step), official recipe",
        "device": args.device,
        "device_description": torch.cuda.get_device_name()
        if cuda
        else f"{platform.processor() or 'cpu'} ({os.cpu_count()} logical CPUs)",
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "loadavg_before": load_before,
        "freed_memory_retained": retained,
        "loadavg_after": os.getloadavg(),
        "official_samples_per_gpu_s": round(OFFICIAL_SAMPLES_PER_GPU_S, 3),
        "notes": "peak_rss_mib is the process's peak resident memory after the run (models built so far "
        "included); on a shared, loaded machine wall-clock rates are lower bounds: compare loadavg.",
        "runs": runs,
    }
    write_result(args.json, report)


if __name__ == "__main__":
    main()
