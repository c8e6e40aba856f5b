"""`hqsam evaluate`: mIoU / mBIoU of SAM's mask, HQ-SAM's mask and the original annotation, per
source and overall, with the official protocol (hqsam_core.evaluation); for COCO sources also mask
AP and Boundary AP (COCOeval, a pair scored by min(mask IoU, Boundary IoU)).

The per-sample loop here (`evaluate_rows`) is also what `hqsam train --val` runs each epoch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.allocator import retain_freed_memory
from hqsam.hqsam_core.build import build_hqsam
from hqsam.hqsam_core.evaluation import evaluate_batch, summarize
from hqsam.hqsam_core.masks import encode_rle
from hqsam.hqsam_core.metrics import boundary_iou_batch
from hqsam.hqsam_core.refiner import BoxRefiner
from hqsam.pipeline.train_sources import SampleError, Source, load_sample, parse_source, source_rows

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


class RecordingRefiner(BoxRefiner):
    """A BoxRefiner that keeps its last decode results per hq_token_only flag (for COCO AP: the
    very masks and scores evaluate_batch scored, without decoding twice)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last: dict[bool, list] = {}

    def decode(self, features, boxes, image_index, *, hq_token_only=False, multimask_output=False):
        result = super().decode(
            features, boxes, image_index, hq_token_only=hq_token_only, multimask_output=multimask_output
        )
        self.last[hq_token_only] = result
        return result


def evaluate_rows(
    refiner: BoxRefiner,
    rows: list[dict],
    batch_size: int,
    *,
    hq_token_only: bool = True,
    resize: str = "square",
    predictions: list | None = None,
) -> tuple[dict[str, list], list[str], int]:
    """Per-sample metrics of sample rows (evaluation.evaluate_batch), each sample's source, and how
    many rows could not be loaded. With `predictions` (and a RecordingRefiner), each sample with
    COCO ids adds {image_id, category_id, segmentation (RLE of the HQ mask), score, mask}."""
    per_sample: dict[str, list] = defaultdict(list)
    sources: list[str] = []
    skipped = 0
    for start in range(0, len(rows), batch_size):
        samples = []
        for row in rows[start : start + batch_size]:
            try:
                samples.append(load_sample(row))
            except SampleError as error:
                log.warning("evaluation: skipping %s: %s", row.get("key"), error)
                skipped += 1
        if not samples:
            continue
        if isinstance(refiner, RecordingRefiner):
            refiner.last = {}
        hq_masks: list[np.ndarray] = []
        result = evaluate_batch(
            refiner,
            [s["image"] for s in samples],
            [s["mask"] for s in samples],
            [s["original"] for s in samples],  # always given: the keys stay aligned across batches
            hq_token_only=hq_token_only,
            resize=resize,
            hq_masks_out=hq_masks,
        )
        for key, values in result.items():
            per_sample[key].extend(values)
        sources.extend(s["source"] for s in samples)
        if predictions is not None:
            _collect(refiner, samples, hq_masks, hq_token_only, predictions)
    return dict(per_sample), sources, skipped


def _collect(
    refiner: BoxRefiner, samples: list[dict], masks: list[np.ndarray], hq_token_only: bool, predictions: list
) -> None:
    decoded = getattr(refiner, "last", {}).get(hq_token_only)
    if decoded is None or len(decoded) != len(samples):
        raise RuntimeError("COCO AP needs a RecordingRefiner whose decode evaluate_batch called")
    for sample, refinement, mask in zip(samples, decoded, masks):
        if sample.get("image_id") is None or sample.get("annotation_id") is None:
            continue
        predictions.append(
            {
                "image_id": int(sample["image_id"]),
                "category_id": int(sample["category_id"]) if sample.get("category_id") is not None else 1,
                "segmentation": encode_rle(mask),
                "score": float(refinement.scores[0]),
                "annotation_id": int(sample["annotation_id"]),
            }
        )


def summarize_by_source(per_sample: dict[str, list], sources: list[str]) -> dict:
    """{"overall": pooled over all samples, "sources": {name: summary}, "samples": N}."""
    aligned = {key: values for key, values in per_sample.items() if len(values) == len(sources)}
    result: dict = {"overall": summarize(aligned) if sources else {}, "sources": {}, "samples": len(sources)}
    for name in dict.fromkeys(sources):
        index = [i for i, s in enumerate(sources) if s == name]
        subset = {key: [values[i] for i in index] for key, values in aligned.items()}
        result["sources"][name] = {**summarize(subset), "samples": len(index)}
    return result


# ---------------------------------------------------------------------------------------------
# COCO mask AP and Boundary AP


def coco_ap(coco_data: dict, predictions: list[dict]) -> dict[str, float]:
    """Mask AP / AP50 / AP75 and Boundary AP / AP50 / AP75 of predictions over the images they cover.

    Boundary AP is COCOeval with each (prediction, non-crowd GT) pair scored by min(mask IoU,
    Boundary IoU) (Cheng et al. 2021, dilation 2% of the image diagonal); crowd GTs keep COCO's
    crowd IoU. Values are fractions in [0, 1] (COCOeval's -1 for "no GT" becomes None).
    """
    if not predictions:
        return {}
    image_ids = sorted({p["image_id"] for p in predictions})
    ground_truth = COCO()
    data = dict(coco_data)
    data.setdefault("categories", [])
    known = {c["id"] for c in data["categories"]}
    data["categories"] = data["categories"] + [
        {"id": c} for c in sorted({p["category_id"] for p in predictions} - known)
    ]
    # COCOeval records a match as the matched GT's id and reads id 0 as "no match": renumber the
    # annotations from 1 (their ids do not enter the metric; files such as labelme's start at 0).
    data["annotations"] = [
        {"iscrowd": 0, "area": 0, **annotation, "id": k + 1}
        for k, annotation in enumerate(data.get("annotations", []))
    ]
    ground_truth.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
        detections = ground_truth.loadRes(
            [{k: p[k] for k in ("image_id", "category_id", "segmentation", "score")} for p in predictions]
        )
    result = {}
    for name, evaluator_class in (("mask", COCOeval), ("boundary", BoundaryCOCOeval)):
        evaluator = evaluator_class(ground_truth, detections, "segm")
        evaluator.params.imgIds = image_ids
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for k, suffix in enumerate(("ap", "ap50", "ap75")):
            value = float(evaluator.stats[k])
            result[f"{name}_{suffix}"] = value if value >= 0 else None
    return result


class BoundaryCOCOeval(COCOeval):
    """COCOeval whose pair score is min(mask IoU, Boundary IoU) for non-crowd GTs (Boundary AP)."""

    def computeIoU(self, imgId, catId):  # noqa: N802, N803 (COCOeval's names)
        ious = super().computeIoU(imgId, catId)
        if len(ious) == 0:
            return ious
        params = self.params
        if params.useCats:
            gts, dts = self._gts[imgId, catId], self._dts[imgId, catId]
        else:
            gts = [g for c in params.catIds for g in self._gts[imgId, c]]
            dts = [d for c in params.catIds for d in self._dts[imgId, c]]
        order = np.argsort([-d["score"] for d in dts], kind="mergesort")  # COCOeval's order
        dts = [dts[i] for i in order][: params.maxDets[-1]]
        ious = np.array(ious, dtype=np.float64)
        gt_masks = None
        for i, dt in enumerate(dts):
            # min(IoU, BIoU) is 0 where the masks do not overlap: Boundary IoU only where they do
            columns = [j for j, g in enumerate(gts) if not g["iscrowd"] and ious[i, j] > 0]
            if not columns:
                continue
            if gt_masks is None:
                gt_masks = mask_utils.decode([g["segmentation"] for g in gts]).transpose(2, 0, 1).astype(bool)
            dt_mask = mask_utils.decode(dt["segmentation"]).astype(bool)
            pairs = gt_masks[columns]
            boundary = boundary_iou_batch(np.broadcast_to(dt_mask, pairs.shape), pairs)
            ious[i, columns] = np.minimum(ious[i, columns], boundary)
        return ious


# ---------------------------------------------------------------------------------------------
# The command


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
