"""The per-sample evaluation loop: load sample rows, refine them, score them with the official
protocol (hqsam_core.evaluation). Run by `hqsam evaluate` and by `hqsam train --val` every epoch."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING

from hqsam.hqsam_core.evaluation import BatchEvaluation, evaluate_batch_with_masks, summarize
from hqsam.hqsam_core.masks import encode_rle
from hqsam.hqsam_core.refiner import BoxRefiner
from hqsam.pipeline.load_samples import SampleError, load_sample
from hqsam.schemas.train_rows import LoadedSample

if TYPE_CHECKING:
    from hqsam.pipeline.progress import ProgressReporter

log = logging.getLogger(__name__)


def evaluate_rows(
    refiner: BoxRefiner,
    rows: list[dict],
    batch_size: int,
    *,
    hq_token_only: bool = True,
    resize: str = "square",
    predictions: list | None = None,
    progress: ProgressReporter | None = None,
) -> tuple[dict[str, list], list[str], int]:
    """Per-sample metrics of sample rows (evaluation.evaluate_batch_with_masks), each sample's source,
    and how many rows could not be loaded. With `predictions`, the COCO detections of the scored HQ
    masks (`coco_predictions`) are appended to it; `progress` advances by each batch's rows."""
    per_sample: dict[str, list] = defaultdict(list)
    sources: list[str] = []
    skipped = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        samples = loadable_samples(batch)
        skipped += len(batch) - len(samples)
        if not samples:
            if progress is not None:
                progress.advance(len(batch), skipped=len(batch))
            continue
        evaluation = evaluate_batch_with_masks(
            refiner,
            [s["image"] for s in samples],
            [s["mask"] for s in samples],
            [s["original"] for s in samples],  # always given: the keys stay aligned across batches
            hq_token_only=hq_token_only,
            resize=resize,
        )
        for key, values in evaluation.metrics.items():
            per_sample[key].extend(values)
        sources.extend(s["source"] for s in samples)
        if predictions is not None:
            predictions.extend(coco_predictions(samples, evaluation))
        if progress is not None:
            progress.advance(len(batch), skipped=len(batch) - len(samples))
    return dict(per_sample), sources, skipped


def loadable_samples(rows: list[dict]) -> list[LoadedSample]:
    """`load_sample` of each row; a row that cannot be loaded is left out with a warning."""
    samples = []
    for row in rows:
        try:
            samples.append(load_sample(row))
        except SampleError as error:
            log.warning("evaluation: skipping %s: %s", row.get("key"), error)
    return samples


def coco_predictions(samples: list[LoadedSample], evaluation: BatchEvaluation) -> list[dict]:
    """COCO detections {image_id, category_id, segmentation (RLE), score, annotation_id} of the HQ
    masks `evaluation` scored, one per sample with COCO ids (category 1 when it has none)."""
    return [
        {
            "image_id": int(sample["image_id"]),
            "category_id": int(sample["category_id"]) if sample.get("category_id") is not None else 1,
            "segmentation": encode_rle(mask),
            "score": score,
            "annotation_id": int(sample["annotation_id"]),
        }
        for sample, mask, score in zip(samples, evaluation.hq_masks, evaluation.hq_scores)
        if sample.get("image_id") is not None and sample.get("annotation_id") is not None
    ]


def summarize_by_source(per_sample: dict[str, list], sources: list[str]) -> dict:
    """{"overall": pooled over all samples, "sources": {name: summary}, "samples": N}."""
    aligned = {key: values for key, values in per_sample.items() if len(values) == len(sources)}
    result: dict = {"overall": summarize(aligned) if sources else {}, "sources": {}, "samples": len(sources)}
    for name in dict.fromkeys(sources):
        index = [i for i, s in enumerate(sources) if s == name]
        subset = {key: [values[i] for i in index] for key, values in aligned.items()}
        result["sources"][name] = {**summarize(subset), "samples": len(index)}
    return result
