"""Prompts guided by the annotation being refined: its mask steers HQ-SAM, not just its box.

- `box`: the box alone.
- `box+points`: a first pass with the box, then `rounds` rounds in which up to `points` points are
  sampled where the current mask and the original disagree (positive where only the original
  covers a pixel, negative where only the refined mask does), `trials` times with different
  points; the trials' low-res logits (and scores) are averaged. Sampling is seeded by the
  annotation's key (its position in the input), so reruns and resumes give the same masks.
- `box+mask`: the box with the original mask as SAM's dense mask prompt (`mask_prompt`).

An annotation without a readable mask is refined with its box alone (`FALLBACK`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hqsam.hqsam_core.refiner import BoxRefiner, PromptSet, RefinedChunk, unpack_masks

PROMPTS = ("box", "box+points", "box+mask")
FALLBACK = "box (no original mask)"  # a guided prompt's annotation that had no mask to follow
MASK_PROMPT_EPS = 1e-3  # mask prompts are logit(covered share) clamped to [eps, 1 - eps]: +-6.9


@dataclass(frozen=True)
class Guidance:
    """How the prompts are made; `rounds`, `points` and `trials` only matter for box+points."""

    prompt: str = "box"
    rounds: int = 1
    points: int = 2
    trials: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {', '.join(PROMPTS)}, got {self.prompt!r}")
        for name in ("rounds", "points", "trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def kind(self, has_original: bool) -> str:
        """The prompt an annotation gets, as its row records it."""
        return self.prompt if self.prompt == "box" or has_original else FALLBACK


def mask_prompt(mask: np.ndarray, image_size: int = 1024) -> np.ndarray:
    """A (H, W) bool mask as SAM's (256, 256) dense mask prompt: resized like the image (longest side
    to `image_size`, padded bottom-right), averaged over 4x4 cells, and each cell's covered share as
    a logit, so the prompt says "in" or "out" as firmly as the mask does."""
    height, width = mask.shape
    scale = image_size / max(height, width)
    size = (int(height * scale + 0.5), int(width * scale + 0.5))
    covered = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    covered = F.interpolate(covered, size=size, mode="bilinear", align_corners=False, antialias=True)
    covered = F.pad(covered, (0, image_size - size[1], 0, image_size - size[0]))
    covered = F.avg_pool2d(covered, image_size // 256)[0, 0]
    return torch.logit(covered.clamp(MASK_PROMPT_EPS, 1 - MASK_PROMPT_EPS)).numpy()


def disagreement_points(
    refined: np.ndarray, original: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray] | None:
    """Up to `count` points where two (H, W) masks disagree, as (count, 2) XY pixel centres and
    (count,) labels: 1 where only `original` covers, 0 where only `refined` does, -1 padding.
    None where the masks agree everywhere."""
    ys, xs = np.nonzero(refined != original)
    if not len(ys):
        return None
    chosen = rng.choice(len(ys), size=min(count, len(ys)), replace=False)
    coords = np.zeros((count, 2), np.float32)
    labels = np.full(count, -1, np.int64)
    coords[: len(chosen)] = np.stack([xs[chosen], ys[chosen]], 1) + 0.5
    labels[: len(chosen)] = original[ys[chosen], xs[chosen]]
    return coords, labels


def refine_guided(
    refiner: BoxRefiner,
    images: Sequence[np.ndarray],
    boxes: Sequence[np.ndarray],
    originals: Sequence[Sequence[np.ndarray | None]],
    keys: Sequence[Sequence[int]],
    guidance: Guidance,
    *,
    hq_token_only: bool = False,
    min_region_area: int = 0,
    with_logits: bool = False,
) -> Iterator[RefinedChunk]:
    """Refine each image's (N_i, 4) XYXY boxes guided by `originals[i][k]`, box k's (H, W) bool
    mask (None: none); `keys[i][k]` seeds box k's point sampling. One RefinedChunk per image with
    boxes, its rows in box order (logits, the averaged ones for box+points, only `with_logits`)."""
    boxes = [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]
    with_boxes = [i for i, b in enumerate(boxes) if len(b)]
    if not with_boxes:
        return
    features = refiner.encode([images[i] for i in with_boxes])
    prompts = PromptSet.of_images([boxes[i] for i in with_boxes])
    flat_originals = [mask for i in with_boxes for mask in originals[i]]
    flat_keys = [int(key) for i in with_boxes for key in keys[i]]
    has = torch.tensor([mask is not None for mask in flat_originals], dtype=torch.bool)
    options = {"hq_token_only": hq_token_only}
    if guidance.prompt == "box+mask" and has.any():
        logits, sam_logits, scores = refiner.decode_low_res(
            features, prompts.take(torch.nonzero(~has)[:, 0]), **options
        )
        guided_rows = torch.nonzero(has)[:, 0]
        masks = np.stack([mask_prompt(flat_originals[k]) for k in guided_rows.tolist()])
        guided = prompts.take(guided_rows)
        guided.mask_inputs = torch.as_tensor(masks)
        results = refiner.decode_low_res(features, guided, **options)
        logits, sam_logits, scores = _merged((logits, sam_logits, scores), results, has)
    else:
        logits, sam_logits, scores = refiner.decode_low_res(features, prompts, **options)
        if guidance.prompt == "box+points":
            for round_ in range(guidance.rounds):
                masks = _masks(refiner, features, prompts, logits, sam_logits, scores)
                logits, sam_logits, scores = _pointed_round(
                    refiner,
                    features,
                    prompts,
                    masks,
                    (logits, sam_logits, scores),
                    flat_originals,
                    flat_keys,
                    round_,
                    guidance,
                    options,
                )
    for image, rows in _image_rows(prompts):
        chunk = refiner.finish(
            features,
            image,
            np.arange(len(rows)),
            logits[rows],
            sam_logits[rows],
            scores[rows],
            min_region_area=min_region_area,
            with_logits=with_logits,
        )
        chunk.image = with_boxes[image]
        yield chunk


def _pointed_round(
    refiner: BoxRefiner,
    features,
    prompts: PromptSet,
    masks: list[np.ndarray],
    results: tuple[torch.Tensor, ...],
    originals: list[np.ndarray | None],
    keys: list[int],
    round_: int,
    guidance: Guidance,
    options: dict,
) -> tuple[torch.Tensor, ...]:
    """One round: `trials` decodes of box + sampled points for every prompt whose mask still
    disagrees with its original, averaged; the others keep their results."""
    logits, sam_logits, scores = (values.clone() for values in results)
    totals = None
    rows = None
    for trial in range(guidance.trials):
        coords, labels, pointed = [], [], []
        for k, original in enumerate(originals):
            if original is None:
                continue
            rng = np.random.default_rng([guidance.seed, keys[k], round_, trial])
            points = disagreement_points(masks[k], original, guidance.points, rng)
            if points is not None:
                pointed.append(k)
                coords.append(points[0])
                labels.append(points[1])
        if not pointed:
            return logits, sam_logits, scores
        rows = torch.tensor(pointed)
        trial_prompts = prompts.take(rows)
        trial_prompts.point_coords = torch.as_tensor(np.stack(coords))
        trial_prompts.point_labels = torch.as_tensor(np.stack(labels))
        results = refiner.decode_low_res(features, trial_prompts, **options)
        totals = results if totals is None else tuple(a + b for a, b in zip(totals, results))
    device_rows = rows.to(logits.device)
    for values, total in zip((logits, sam_logits, scores), totals):
        values[device_rows] = total / guidance.trials
    return logits, sam_logits, scores


def _masks(refiner: BoxRefiner, features, prompts: PromptSet, *results: torch.Tensor) -> list[np.ndarray]:
    """Every prompt's thresholded mask at its image's size (host bool)."""
    masks: list[np.ndarray | None] = [None] * len(prompts.boxes)
    logits, sam_logits, scores = results
    for image, rows in _image_rows(prompts):
        chunk = refiner.finish(
            features, image, np.arange(len(rows)), logits[rows], sam_logits[rows], scores[rows]
        )
        height, width = features.original_sizes[image]
        for k, mask in zip(rows.tolist(), unpack_masks(chunk.packed_masks, height, width)):
            masks[k] = mask
    return masks


def _image_rows(prompts: PromptSet) -> Iterator[tuple[int, torch.Tensor]]:
    """Each encoded image and the positions of its prompts, in order."""
    for image in prompts.image_index.unique().tolist():
        yield image, torch.nonzero(prompts.image_index == image)[:, 0]


def _merged(plain: tuple[torch.Tensor, ...], guided: tuple[torch.Tensor, ...], is_guided: torch.Tensor):
    """Results of the unguided and the guided prompts put back in the prompts' order."""
    merged = []
    for a, b in zip(plain, guided):
        values = torch.empty((len(is_guided), *b.shape[1:]), dtype=b.dtype, device=b.device)
        values[is_guided.to(b.device)] = b
        values[~is_guided.to(b.device)] = a
        merged.append(values)
    return tuple(merged)
