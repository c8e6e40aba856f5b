"""The `hqsam evaluate` run: mIoU / mBIoU of SAM's mask, HQ-SAM's mask and the original annotation,
per source and overall, with the official protocol (hqsam_core.evaluation); for COCO sources also
mask AP and Boundary AP (hqsam_core.coco_eval). Writes the report as JSON; `format_table` prints it.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import torch

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.allocator import retain_freed_memory
from hqsam.hqsam_core.build import build_hqsam
from hqsam.hqsam_core.coco_eval import coco_ap
from hqsam.hqsam_core.refiner import BoxRefiner
from hqsam.pipeline.evaluate_samples import evaluate_rows, summarize_by_source
from hqsam.pipeline.progress import ProgressReporter
from hqsam.pipeline.train_sources import Source, parse_source, source_rows

METRIC_COLUMNS = (
    ("SAM mIoU", "sam_miou"),
    ("SAM mBIoU", "sam_mbiou"),
    ("HQ mIoU", "hq_miou"),
    ("HQ mBIoU", "hq_mbiou"),
    ("orig mIoU", "original_miou"),
    ("orig mBIoU", "original_mbiou"),
    ("mask AP", "mask_ap"),
    ("bound. AP", "boundary_ap"),
)
MEAN_IOU_KEYS = [key for _, key in METRIC_COLUMNS[:6]]


@dataclass
class EvaluateConfig:
    data: list[str]
    out: str
    model: str = "vit_tiny"
    checkpoint: str = "sam_hq_vit_tiny"
    hq_head: str | None = None
    device: str = "cpu"
    batch_size: int = 4
    hq_token_only: bool = True
    resize: str = "square"  # hqsam_core.evaluation.RESIZE_MODES
    min_score: float | None = None
    limit: int | None = None  # samples per source


@dataclass
class SourceEvaluation:
    """One source's report entry and the per-sample scores it was summarized from."""

    name: str
    entry: dict
    per_sample: dict[str, list]
    sources: list[str]  # each sample's source name, as the sample rows give it


def run_evaluate(config: EvaluateConfig, *, progress: bool = True) -> dict:
    """Evaluate every source; returns the report (also written to config.out as JSON)."""
    started = time.time()
    sources = [parse_source(text) for text in config.data]
    if config.device == "cpu":
        retain_freed_memory()
    refiner = BoxRefiner(build_hqsam(config.model, config.checkpoint, config.hq_head), config.device)
    evaluated = [evaluate_source(refiner, source, config, progress) for source in sources]
    report: dict = {
        "sources": {e.name: e.entry for e in evaluated},
        "overall": pooled_summary(evaluated),
    }
    report["mean_of_sources"] = mean_of_sources(list(report["sources"].values()))
    report["settings"] = {key: value for key, value in asdict(config).items() if key != "out"}
    report["protocol"] = protocol(config)
    report["wall_time_s"] = round(time.time() - started, 3)
    storage.write_json(config.out, report)
    return report


def evaluate_source(
    refiner: BoxRefiner, source: Source, config: EvaluateConfig, progress: bool = True
) -> SourceEvaluation:
    """One source's summary (plus mask and Boundary AP for a COCO source)."""
    rows = source_rows(source, min_score=config.min_score).to_pylist()
    if config.limit is not None:
        rows = rows[: config.limit]
    predictions: list | None = [] if source.kind == "coco" else None
    reporter = ProgressReporter(
        f"evaluate {_short(source.text or source.uri)}",
        len(rows),
        unit="samples",
        counters=("skipped",),
        enabled=progress,
    )
    with torch.inference_mode(), reporter:
        per_sample, names, skipped = evaluate_rows(
            refiner,
            rows,
            config.batch_size,
            hq_token_only=config.hq_token_only,
            resize=config.resize,
            predictions=predictions,
            progress=reporter,
        )
    summary = summarize_by_source(per_sample, names)
    entry = {**summary["overall"], "samples": len(names), "skipped": skipped, "kind": source.kind}
    if predictions:
        entry.update(coco_ap(storage.read_json(source.uri), predictions))
    return SourceEvaluation(source.text or source.uri, entry, per_sample, names)


def pooled_summary(evaluated: list[SourceEvaluation]) -> dict:
    """The summary over every source's samples pooled (a sample-weighted mean of the sources)."""
    pooled: dict[str, list] = defaultdict(list)
    names: list[str] = []
    for source in evaluated:
        for key, values in source.per_sample.items():
            if len(values) == len(source.sources):
                pooled[key].extend(values)
        names.extend(source.sources)
    overall = dict(summarize_by_source(dict(pooled), names)["overall"])
    overall["samples"] = len(names)
    overall["skipped"] = sum(source.entry["skipped"] for source in evaluated)
    return overall


def mean_of_sources(entries: list[dict]) -> dict[str, float]:
    """The unweighted mean over sources with samples of each mIoU / mBIoU they report."""
    with_samples = [entry for entry in entries if entry["samples"]]
    return {
        key: float(np.mean([entry[key] for entry in with_samples if key in entry]))
        for key in MEAN_IOU_KEYS
        if any(key in entry for entry in with_samples)
    }


def protocol(config: EvaluateConfig) -> str:
    """The evaluation protocol in words, for the report."""
    resize = (
        "image squashed to 1024x1024 (the official loader); "
        if config.resize == "square"
        else "longest side resized to 1024, aspect kept; "
    )
    hq_mask = "HQ-only output" if config.hq_token_only else "SAM + HQ output"
    return (
        f"GT tight box prompt; {resize}logits upsampled to the GT size; threshold 0; "
        f"HQ mask = {hq_mask}; per-sample means"
    )


def format_table(report: dict) -> str:
    """A small fixed-width table: one line per source, then overall."""
    lines = [(name, entry) for name, entry in report["sources"].items()] + [("overall", report["overall"])]
    shown = [(label, key) for label, key in METRIC_COLUMNS if any(key in e for _, e in lines)]
    width = max(12, *(len(_short(n)) for n, _ in lines))
    header = f"{'source':<{width}}  {'n':>5}  " + "  ".join(f"{label:>10}" for label, _ in shown)
    rows = [header, "-" * len(header)]
    for name, entry in lines:
        cells = "  ".join(f"{_percent(entry.get(key)):>10}" for _, key in shown)
        rows.append(f"{_short(name):<{width}}  {entry.get('samples', 0):>5}  {cells}")
    return "\n".join(rows)


def _short(name: str) -> str:
    return name if len(name) <= 40 else "..." + name[-37:]


def _percent(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}"
