"""Stage 3 (GPU when present): refine every pending box with HQ-SAM, images batched with all their boxes."""

from __future__ import annotations

import numpy as np
import torch

from hqsam.hqsam_core import BoxRefiner, build_hqsam
from hqsam.hqsam_core.allocator import retain_freed_memory
from hqsam.hqsam_core.errors import one_line
from hqsam.schemas.status import Status


class RefineMasks:
    """An actor holding one BoxRefiner; called on batches of decoded image rows (numpy format).

    Adds `packed_masks` (per annotation: np.packbits of the HxW mask, empty unless refined) and
    `scores`; turns pending statuses into ok, or inference_failed with the error.
    """

    def __init__(
        self,
        variant: str,
        checkpoint: str,
        hq_head: str | None,
        device: str,
        *,
        max_prompts: int | None = None,
        hq_token_only: bool = False,
        torch_threads: int | None = None,
        precision: str | None = None,
        compile: bool = False,  # noqa: A002 - mirrors BoxRefiner's option
        crop_zoom: float | None = None,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        if not device.startswith("cuda"):
            retain_freed_memory()
        model = build_hqsam(variant, checkpoint, hq_head)
        self.refiner = BoxRefiner(
            model, device, max_prompts=max_prompts, precision=precision, compile=compile
        )
        self.crop_zoom = crop_zoom
        self.hq_token_only = hq_token_only

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["image_id"])
        statuses = [list(s) for s in batch["statuses"]]
        errors = [list(e) for e in batch["errors"]]
        packed = [[b""] * len(s) for s in statuses]
        scores = [[float("nan")] * len(s) for s in statuses]
        work = [i for i in range(count) if Status.PENDING in statuses[i]]
        for i, result in self._refine_isolating_failures(batch, statuses, work):
            pending = [k for k, status in enumerate(statuses[i]) if status == Status.PENDING]
            if isinstance(result, Exception):
                for k in pending:
                    statuses[i][k], errors[i][k] = "inference_failed", one_line(result)
                continue
            for position, k in enumerate(pending):
                packed[i][k] = np.packbits(result.masks[position].reshape(-1)).tobytes()
                scores[i][k] = float(result.scores[position])
                statuses[i][k] = "ok"
        out = {key: value for key, value in batch.items() if key not in ("pixels", "prompts")}
        out["statuses"], out["errors"] = _objects(statuses), _objects(errors)
        out["packed_masks"], out["scores"] = _objects(packed), _objects(scores)
        return out

    def _refine_isolating_failures(self, batch, statuses, work):
        """Refine the images in `work` together; if that fails, one by one, so a bad image fails alone."""
        try:
            yield from zip(work, self._refine(batch, statuses, work))
        except Exception:
            for i in work:
                try:
                    (result,) = self._refine(batch, statuses, [i])
                except Exception as error:
                    result = error
                yield i, result

    def _refine(self, batch, statuses, indexes):
        images = [batch["pixels"][i] for i in indexes]
        boxes = [
            np.asarray(batch["prompts"][i], np.float32)[[s == Status.PENDING for s in statuses[i]]]
            for i in indexes
        ]
        return self.refiner.refine(images, boxes, hq_token_only=self.hq_token_only, crop_zoom=self.crop_zoom)


def _objects(rows: list) -> np.ndarray:
    array = np.empty(len(rows), dtype=object)
    array[:] = rows
    return array
