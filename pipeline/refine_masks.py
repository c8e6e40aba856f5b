"""Stage (GPU when present): refine every pending annotation with HQ-SAM, images batched with all
their prompts; each mask rated (stability, agreement with SAM) and cleaned (--min-region-area)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hqsam.hqsam_core.errors import one_line
from hqsam.hqsam_core.masks import segmentation_json_to_mask
from hqsam.pipeline.stage import Row, Stage
from hqsam.schemas.status import Status

if TYPE_CHECKING:
    from hqsam.pipeline.refine_pipeline import RefineSettings


@dataclass
class Refined:
    """One image's refined pending annotations, in order."""

    packed_masks: np.ndarray  # (N, ceil(H*W/8)) uint8
    scores: np.ndarray  # (N,) float32
    stability: np.ndarray  # (N,) float32
    sam_hq_iou: np.ndarray  # (N,) float32
    prompt_kinds: list[str]

    @classmethod
    def blank(cls, count: int, height: int, width: int) -> Refined:
        return cls(
            np.zeros((count, -(-height * width // 8)), np.uint8),
            *(np.zeros(count, np.float32) for _ in range(3)),
            prompt_kinds=[""] * count,
        )

    def take(self, chunk) -> None:
        """A refiner chunk's results into their rows."""
        self.packed_masks[chunk.rows] = chunk.packed_masks
        self.scores[chunk.rows] = chunk.scores
        self.stability[chunk.rows] = chunk.stability
        self.sam_hq_iou[chunk.rows] = chunk.sam_hq_iou


# Host memory a refine actor needs (weights, activations); asking for it also keeps Ray from
# fusing the IO and decode stages into the refine actor.
ACTOR_MEMORY_GIB = {"vit_tiny": 2, "vit_b": 3, "vit_l": 5, "vit_h": 8}

NO_MASKS = np.zeros((0, 0), np.uint8)  # the packed masks of an image with no ok annotation


def nothing_refined(row: Row) -> Row:
    """The fields RefineMasks adds, as for a row none of whose annotations was refined."""
    count = len(row["statuses"])
    row["statuses"], row["errors"] = list(row["statuses"]), list(row["errors"])
    row["packed_masks"], row["scores"] = NO_MASKS, [math.nan] * count
    row["stabilities"] = np.full(count, np.nan, np.float32)
    row["sam_hq_ious"] = np.full(count, np.nan, np.float32)
    row["prompt_kinds"] = [""] * count
    return row


class RefineMasks(Stage):
    """Holds one BoxRefiner (an actor pool under Ray) and refines batches of decoded images.

    Every pending annotation becomes ok, with its packed mask and score, or inference_failed with
    the error; a batch that fails is retried image by image, so a bad image fails alone.
    """

    reads = ("pixels", "prompts", "statuses", "errors", "segmentations", "ann_indices")
    adds = ("packed_masks", "scores", "stabilities", "sam_hq_ious", "prompt_kinds")
    drops = ("pixels",)
    on_actor = True

    def __init__(self, settings: RefineSettings) -> None:
        self.settings = settings
        self.batch_size = settings.batch_size
        self.refiner = None  # built by setup(), where the stage runs

    def setup(self) -> None:
        if self.refiner is not None:
            return  # built already
        import torch

        from hqsam.hqsam_core import BoxRefiner, build_hqsam
        from hqsam.hqsam_core.allocator import retain_freed_memory

        settings = self.settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        if not settings.device.startswith("cuda"):
            retain_freed_memory()
        model = build_hqsam(settings.variant, settings.checkpoint, settings.hq_head)
        self.refiner = BoxRefiner(
            model,
            settings.device,
            max_prompts=settings.max_prompts,
            precision=settings.precision,
            compile=settings.compile,
        )

    def ray_options(self) -> dict[str, Any]:
        import ray

        settings = self.settings
        return {
            # One call at a time per actor (max_concurrency 1) either way; this runs it on the actor's
            # main thread instead of a helper thread, where the same CPU refine took ~40% longer
            # (2-core CPU, vit_tiny, measured with benchmarks/pipeline.py's data).
            "compute": ray.data.ActorPoolStrategy(
                min_size=settings.min_actors, max_size=settings.max_actors, enable_true_multi_threading=True
            ),
            "num_gpus": 1 if settings.device.startswith("cuda") else 0,
            "memory": ACTOR_MEMORY_GIB[settings.variant] * 2**30,
        }

    def process(self, rows: list[Row]) -> list[Row]:
        for row in rows:
            nothing_refined(row)
        work = [row for row in rows if Status.PENDING in row["statuses"]]
        for row, result in self._refine_isolating_failures(work):
            statuses, errors = row["statuses"], row["errors"]
            pending = [k for k, status in enumerate(statuses) if status == Status.PENDING]
            if isinstance(result, Exception):
                for k in pending:
                    statuses[k], errors[k] = Status.INFERENCE_FAILED, one_line(result)
                continue
            row["packed_masks"] = result.packed_masks  # one row per pending, now ok, annotation
            for position, k in enumerate(pending):
                row["scores"][k] = float(result.scores[position])
                row["stabilities"][k] = result.stability[position]
                row["sam_hq_ious"][k] = result.sam_hq_iou[position]
                row["prompt_kinds"][k] = result.prompt_kinds[position]
                statuses[k] = Status.OK
        for row in rows:
            for name in self.drops:  # what the declaration says, so the two cannot part
                del row[name]
        return rows

    def _refine_isolating_failures(self, rows: list[Row]) -> Iterator[tuple[Row, Refined | Exception]]:
        """Refine `rows` together; if that fails, one by one, so a bad image fails alone."""
        try:
            yield from zip(rows, self._refine(rows))
        except Exception:
            for row in rows:
                try:
                    (result,) = self._refine([row])
                except Exception as error:
                    result = error
                yield row, result

    def _refine(self, rows: list[Row]) -> list[Refined]:
        """Each row's results for its pending annotations, in order. The refiner hands each
        decoder chunk's masks over already packed, so only packed masks add up, not full-size ones."""
        from hqsam.hqsam_core.guided import refine_guided

        settings, guidance = self.settings, self.settings.guidance
        pending = [[s == Status.PENDING for s in row["statuses"]] for row in rows]
        boxes = [np.asarray(row["prompts"], np.float32)[chosen] for row, chosen in zip(rows, pending)]
        pixels = [row["pixels"] for row in rows]
        results = [Refined.blank(len(b), *p.shape[:2]) for p, b in zip(pixels, boxes)]
        options = {"hq_token_only": settings.hq_token_only, "min_region_area": settings.min_region_area}
        if guidance.prompt == "box":
            chunks = self.refiner.refine_chunks(pixels, boxes, crop_zoom=settings.crop_zoom, **options)
            for result in results:
                result.prompt_kinds = [guidance.prompt] * len(result.prompt_kinds)
        else:
            originals = [
                [
                    segmentation_json_to_mask(text, *p.shape[:2])
                    for text, chosen in zip(row["segmentations"], row_pending)
                    if chosen
                ]
                for row, p, row_pending in zip(rows, pixels, pending)
            ]
            keys = [np.asarray(row["ann_indices"])[chosen] for row, chosen in zip(rows, pending)]
            for result, masks in zip(results, originals):
                result.prompt_kinds = [guidance.kind(mask is not None) for mask in masks]
            chunks = refine_guided(self.refiner, pixels, boxes, originals, keys, guidance, **options)
        for chunk in chunks:
            results[chunk.image].take(chunk)
        return results
