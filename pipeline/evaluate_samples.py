"""The per-sample evaluation loop: load sample rows, refine them, score them with the official
protocol (hqsam_core.evaluation). Run by `hqsam evaluate` and by `hqsam train --val` every epoch."""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from hqsam.hqsam_core.evaluation import evaluate_batch, summarize
from hqsam.hqsam_core.masks import encode_rle
from hqsam.hqsam_core.refiner import BoxRefiner
from hqsam.pipeline.train_sources import SampleError, load_sample

log = logging.getLogger(__name__)


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
