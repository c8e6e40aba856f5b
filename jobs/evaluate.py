"""`hqsam evaluate`: mIoU / mBIoU of SAM's mask, HQ-SAM's mask and the original annotation, per
source and overall, with the official protocol (hqsam_core.evaluation); for COCO sources also mask
AP and Boundary AP (COCOeval, a pair scored by min(mask IoU, Boundary IoU)).

The per-sample loop here (`evaluate_rows`) is also what `hqsam train --val` runs each epoch.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.allocator import retain_freed_memory
from hqsam.hqsam_core.build import build_hqsam
from hqsam.hqsam_core.coco_eval import BoundaryCOCOeval, coco_ap  # noqa: F401
from hqsam.pipeline.evaluate_samples import RecordingRefiner, evaluate_rows, summarize_by_source  # noqa: F401
from hqsam.pipeline.train_sources import SampleError, Source, load_sample, parse_source, source_rows  # noqa: F401

log = logging.getLogger(__name__)

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
    extra: dict = field(default_factory=dict)


def run_evaluate(config: EvaluateConfig) -> dict:
    """Evaluate every source; returns the report (also written to config.out as JSON)."""
    started = time.time()
    sources = [parse_source(text) for text in config.data]
    if config.device == "cpu":
        retain_freed_memory()
    model = build_hqsam(config.model, config.checkpoint, config.hq_head)
    refiner = RecordingRefiner(model, config.device)
    report: dict = {"sources": {}, "overall": {}}
    pooled: dict[str, list] = defaultdict(list)
    pooled_sources: list[str] = []
    skipped_total = 0
    for source in sources:
        rows = source_rows(source, min_score=config.min_score).to_pylist()
        if config.limit is not None:
            rows = rows[: config.limit]
        predictions: list | None = [] if source.kind == "coco" else None
        with torch.inference_mode():
            per_sample, names, skipped = evaluate_rows(
                refiner,
                rows,
                config.batch_size,
                hq_token_only=config.hq_token_only,
                resize=config.resize,
                predictions=predictions,
            )
        skipped_total += skipped
        summary = summarize_by_source(per_sample, names)
        entry = {**summary["overall"], "samples": len(names), "skipped": skipped, "kind": source.kind}
        if predictions:
            entry.update(coco_ap(_coco_data(source), predictions))
        report["sources"][source.text or source.uri] = entry
        for key, values in per_sample.items():
            if len(values) == len(names):
                pooled[key].extend(values)
        pooled_sources.extend(names)
    report["overall"] = {**summarize_by_source(dict(pooled), pooled_sources)["overall"]}
    report["overall"]["samples"] = len(pooled_sources)
    report["overall"]["skipped"] = skipped_total
    per_source = [entry for entry in report["sources"].values() if entry["samples"]]
    report["mean_of_sources"] = {
        key: float(np.mean([entry[key] for entry in per_source if key in entry]))
        for _, key in METRIC_COLUMNS[:6]
        if any(key in entry for entry in per_source)
    }
    report["settings"] = {k: v for k, v in asdict(config).items() if k not in ("out", "extra")}
    report["protocol"] = (
        "GT tight box prompt; "
        + (
            "image squashed to 1024x1024 (the official loader); "
            if config.resize == "square"
            else "longest side resized to 1024, aspect kept; "
        )
        + "logits upsampled to the GT size; threshold 0; "
        f"HQ mask = {'HQ-only output' if config.hq_token_only else 'SAM + HQ output'}; per-sample means"
    )
    report["wall_time_s"] = round(time.time() - started, 3)
    storage.write_json(config.out, report)
    return report


def _coco_data(source: Source) -> dict:
    return storage.read_json(source.uri)


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


# --- the `hqsam evaluate` command ------------------------------------------------------------------
# (moved from jobs/cli.py; its options use the shared declarations in jobs/options.py)

import typer  # noqa: E402

from hqsam.hqsam_core.variants import VARIANTS  # noqa: E402
from hqsam.jobs.options import ADDRESS_OPTION, DETACH_OPTION, FORWARD_ENV_OPTION, fail  # noqa: E402
from hqsam.jobs.submit import submit_if_requested  # noqa: E402,F401

MODEL_HELP = f"Model variant: {', '.join(VARIANTS)}."
CHECKPOINT_HELP = (
    "Weights: a path, an fsspec URI (s3://, gs://, https://) or a zoo name such as sam_hq_vit_tiny. "
    "Default: the official HQ-SAM file of --model, downloaded once into $HQSAM_CACHE."
)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


DATA_HELP = (
    "Data source; repeat for several. An image+gt folder pair SRC (SRC/im/*.jpg|png, SRC/gt/*.png by "
    "stem), a COCO instances JSON, or the OUT of `hqsam refine` (status ok rows); local or s3://, gs://. "
    "Options after '::': images=ROOT (COCO image root), original=URI (the original annotation to score "
    "too: PNG folder or COCO file with the same ids)."
)


def evaluate(
    data: list[str] = typer.Option(..., "--data", help=DATA_HELP),
    out: str = typer.Option(..., "--out", help="JSON report file (local or s3://)."),
    model: str = typer.Option("vit_tiny", "--model", help=MODEL_HELP),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    hq_head: str | None = typer.Option(
        None, "--hq-head", help="HQ head file to combine with a plain SAM checkpoint (e.g. OUT/hq_head.pth)."
    ),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Images per encoder batch."),
    hq_token_only: bool = typer.Option(
        True,
        "--hq-token-only/--no-hq-token-only",
        help="Score the HQ-only output (the paper's HQ-set protocol) or SAM + HQ.",
    ),
    resize: str = typer.Option(
        "square",
        "--resize",
        help="square: images squashed to 1024x1024 as the official evaluation loader does (comparable "
        "with the paper); longest: longest side to 1024, aspect kept, as `hqsam refine` runs.",
    ),
    min_score: float | None = typer.Option(
        None, "--min-score", help="Refined-Parquet sources: keep rows whose score is at least this."
    ),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Evaluate the first N samples of each source."
    ),
    address: str | None = ADDRESS_OPTION,
    detach: bool = DETACH_OPTION,
    forward_env: list[str] = FORWARD_ENV_OPTION,
) -> None:
    """mIoU and mBIoU of SAM's mask, the HQ mask and the original annotation, per source and overall.

    Official protocol: GT tight box prompt, image squashed to 1024x1024 (--resize), HQ mask upsampled
    to the GT size, per-sample means. COCO sources also get mask AP and Boundary AP (COCOeval, min(mask IoU, Boundary
    IoU)). Prints a table (percent) and writes the JSON report (fractions).
    """
    submit_if_requested(address, detach, forward_env)
    from hqsam.hqsam_core import CheckpointError
    from hqsam.hqsam_core.zoo import CheckpointSourceError
    from hqsam.jobs.evaluate import EvaluateConfig, format_table, run_evaluate
    from hqsam.pipeline.train_sources import SourceError

    if model not in VARIANTS:
        fail(f"unknown --model {model!r}; choose one of {', '.join(VARIANTS)}")
    if resize not in ("square", "longest"):
        fail(f"unknown --resize {resize!r}; choose square or longest")
    config = EvaluateConfig(
        data=data,
        out=out,
        model=model,
        checkpoint=checkpoint or f"sam_hq_{model}",
        hq_head=hq_head,
        device=device or default_device(),
        batch_size=batch_size,
        hq_token_only=hq_token_only,
        resize=resize,
        min_score=min_score,
        limit=limit,
    )
    try:
        report = run_evaluate(config)
    except (CheckpointError, CheckpointSourceError, SourceError) as error:
        fail(str(error))
    typer.echo(format_table(report))
    typer.echo(f"report -> {out}")
