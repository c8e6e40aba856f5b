"""HQ-SAM's evaluation protocol (REFERENCE section 4; SysCV/sam-hq train/train.py `evaluate`).

Per sample: the GT's tight box is the prompt, decoded once by SAM alone and once by HQ-SAM, both on
one encoding; masks are low-res logits upsampled to the GT size and thresholded at 0; mask IoU and
Boundary IoU (d = 2% of the diagonal) against the GT; per-image means (`summarize`).

- The SAM mask is SAM's own single-mask output: segment_anything's `MaskDecoder` forward run on the
  HQ decoder's SAM weights (no HQ token). It is not (SAM + HQ logits) - (HQ logits): the HQ decoder's
  mask-token-0 output differs from SAM's because the HQ token takes part in the two-way transformer's
  attention (tokens attend to it, and the image embedding attends to the tokens).
- The HQ mask is, by default, the HQ-only output (`hq_token_only=True`): the official evaluation on
  the HQ sets (DIS5K-VD, COIFT, HRSOD, ThinObject5K-TE; the paper's mIoU/mBIoU) calls the decoder with
  hq_token_only=False but scores its second return value, the HQ token's mask alone. Its demos use
  SAM + HQ (hq_token_only=False) for COCO-style multi-object data: pass `hq_token_only=False` there.
- `resize="square"` (default) reproduces the official evaluation loader exactly: image squashed to
  1024x1024 (bilinear, truncated to uint8), box from the GT squashed the same way (> 128 of 255),
  256x256 logits resized straight to the GT size. `resize="longest"` is the BoxRefiner path that
  `hqsam refine` uses: longest side to 1024, aspect kept, box in original pixels; logits upsampled
  to 1024, padding cropped, resized to the GT.
- Boxes are the official `masks_to_boxes`: inclusive pixel indices (see `masks.tight_box_inclusive`). An
  empty GT gets the box (0, 0, 0, 0); its scores are 1.0 for an empty prediction and 0.0 otherwise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling.mask_decoder import MaskDecoder
from torch import nn

from hqsam.hqsam_core.arrays import writable
from hqsam.hqsam_core.fast_attention import attention_kind
from hqsam.hqsam_core.hqsam import HQSam
from hqsam.hqsam_core.masks import tight_box_inclusive
from hqsam.hqsam_core.metrics import boundary_iou_batch, mask_iou_batch
from hqsam.hqsam_core.refiner import BoxRefiner, EncodedImages

RESIZE_MODES = ("longest", "square")
SAM_KEYS = ("sam_iou", "sam_biou", "hq_iou", "hq_biou")


@dataclass
class SampleScores:
    """Scores of one predicted mask against its ground truth."""

    iou: float
    boundary_iou: float


def score_masks(predictions: list[np.ndarray], gts: list[np.ndarray]) -> list[SampleScores]:
    """Mask IoU and Boundary IoU of each HxW prediction against its same-sized GT (sizes may vary)."""
    if len(predictions) != len(gts):
        raise ValueError(f"{len(predictions)} predictions but {len(gts)} ground truths")
    scores = []
    for prediction, gt in zip(predictions, gts):
        a, b = _as_mask(prediction)[None], _as_mask(gt)[None]
        if a.shape != b.shape:
            raise ValueError(f"prediction of shape {a.shape[1:]} for a GT of shape {b.shape[1:]}")
        scores.append(SampleScores(float(mask_iou_batch(a, b)[0]), float(boundary_iou_batch(a, b)[0])))
    return scores


def _as_mask(mask: np.ndarray) -> np.ndarray:
    """Bool masks as they are; uint8 masks are 0/255 images (foreground > 128, as the official
    evaluation) unless they only hold 0/1 (pycocotools' annToMask); other numbers: > 0.5."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if mask.dtype == np.uint8 and mask.size and mask.max() > 1:
        return mask > 128
    return mask > 0.5


def _as_refiner(refiner_or_model: BoxRefiner | nn.Module) -> tuple[BoxRefiner, nn.Module | None, bool]:
    if isinstance(refiner_or_model, BoxRefiner):
        return refiner_or_model, None, False
    model = refiner_or_model
    while not isinstance(model, HQSam):  # unwrap DDP (.module) and HQTrainingModule (.model)
        inner = getattr(model, "module", None)
        inner = getattr(model, "model", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            break
        model = inner
    if not isinstance(model, HQSam):
        raise TypeError(f"expected a BoxRefiner or an HQSam, got {type(refiner_or_model).__name__}")
    was_training = model.training
    # fp32 and the model's attention modules as they are: the official computation, and no change
    # to a model that is being trained
    refiner = BoxRefiner(
        model, device=model.device, precision="fp32", attention=attention_kind(model) or "sam"
    )
    return refiner, model, was_training


def _squash(image: np.ndarray, size: int) -> np.ndarray:
    """The official evaluation resize: bilinear to size x size on floats, then truncated to uint8."""
    tensor = torch.from_numpy(writable(np.ascontiguousarray(image))).permute(2, 0, 1).float()[None]
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[0]
    return resized.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _squashed_box(gt: np.ndarray, size: int) -> np.ndarray | None:
    label = torch.from_numpy(gt.astype(np.float32) * 255.0)[None, None]
    resized = F.interpolate(label, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return tight_box_inclusive((resized > 128).numpy())


@dataclass
class BatchEvaluation:
    """One evaluated batch: the per-sample scores, and the HQ masks and decoder scores behind them
    (what COCO AP needs, without decoding again)."""

    metrics: dict[str, list[float | None]]  # see evaluate_batch
    hq_masks: list[np.ndarray]  # HxW bool at the GT's size, as scored
    hq_scores: list[float]  # the decoder's predicted IoU of each HQ mask


def evaluate_batch(
    refiner_or_model: BoxRefiner | nn.Module,
    images: list[np.ndarray],
    gt_masks: list[np.ndarray],
    originals: list[np.ndarray | None] | None = None,
    **options,
) -> dict[str, list[float | None]]:
    """The per-sample scores of `evaluate_batch_with_masks` (same arguments and options)."""
    return evaluate_batch_with_masks(refiner_or_model, images, gt_masks, originals, **options).metrics


def evaluate_batch_with_masks(
    refiner_or_model: BoxRefiner | nn.Module,
    images: list[np.ndarray],
    gt_masks: list[np.ndarray],
    originals: list[np.ndarray | None] | None = None,
    *,
    hq_token_only: bool = True,
    resize: str = "square",
) -> BatchEvaluation:
    """Score SAM's and HQ-SAM's masks (and optional original annotations) against one GT per image.

    `images`: HxWx3 uint8 RGB; `gt_masks` / `originals`: HxW masks of the same size (see `_as_mask`).
    Metrics are per-sample lists {"sam_iou", "sam_biou", "hq_iou", "hq_biou"} and, when `originals`
    is given, {"original_iou", "original_biou"} with None where a sample has no original. Given a
    model (HQSam, or a DDP / HQTrainingModule wrapper of one), it runs in fp32 on the model's device
    with its attention modules as they are, and restores the model's train/eval mode afterwards; pass
    a BoxRefiner to choose precision and attention (e.g. bf16 on CUDA). See the module docstring for
    the protocol.
    """
    gts = _checked_inputs(images, gt_masks, originals, resize)
    metrics: dict[str, list[float | None]] = {key: [] for key in SAM_KEYS}
    hq_masks: list[np.ndarray] = []
    hq_scores: list[float] = []
    if images:
        refiner, model, was_training = _as_refiner(refiner_or_model)
        try:
            sam_masks, hq_masks, hq_scores = _predict(refiner, images, gts, hq_token_only, resize)
        finally:
            if model is not None:
                model.train(was_training)
        for name, predictions in (("sam", sam_masks), ("hq", hq_masks)):
            scores = score_masks(predictions, gts)
            metrics[f"{name}_iou"] = [s.iou for s in scores]
            metrics[f"{name}_biou"] = [s.boundary_iou for s in scores]
    if originals is not None:
        scores = [score_masks([o], [gt])[0] if o is not None else None for o, gt in zip(originals, gts)]
        metrics["original_iou"] = [None if s is None else s.iou for s in scores]
        metrics["original_biou"] = [None if s is None else s.boundary_iou for s in scores]
    return BatchEvaluation(metrics, hq_masks, hq_scores)


def _checked_inputs(
    images: list[np.ndarray], gt_masks: list[np.ndarray], originals: list | None, resize: str
) -> list[np.ndarray]:
    """The GTs as bool masks, after checking that every argument fits the others."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if len(images) != len(gt_masks) or (originals is not None and len(originals) != len(images)):
        raise ValueError("images, gt_masks and originals must have one entry per sample")
    gts = [_as_mask(gt) for gt in gt_masks]
    for image, gt in zip(images, gts):
        if image.ndim != 3 or image.shape[:2] != gt.shape:
            raise ValueError(f"image of shape {image.shape} for a GT mask of shape {gt.shape}")
    return gts


def _predict(
    refiner: BoxRefiner, images: list[np.ndarray], gts: list[np.ndarray], hq_token_only: bool, resize: str
) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
    """SAM and HQ masks at GT size for each image's GT box, and the HQ masks' predicted IoU."""
    model, device = refiner.model, refiner.device
    size = model.image_encoder.img_size
    if resize == "square":
        inputs = [_squash(image, size) for image in images]
        boxes = [_squashed_box(gt, size) for gt in gts]
    else:
        inputs = list(images)
        boxes = [tight_box_inclusive(gt) for gt in gts]
    boxes = np.stack([np.zeros(4, np.float32) if box is None else box for box in boxes])
    features = refiner.encode(inputs)
    hq = refiner.decode(features, boxes, np.arange(len(images)), hq_token_only=hq_token_only)

    sam_masks, hq_masks = [], []
    with torch.inference_mode():
        for i, gt in enumerate(gts):
            sam_logits = sam_low_res_logits(refiner, features, i, boxes[i : i + 1])
            if resize == "square":  # 256x256 logits of the squashed image straight to the GT size
                hq_logits = torch.from_numpy(hq[i].logits[:, None]).to(device)
                for logits, out in ((sam_logits, sam_masks), (hq_logits, hq_masks)):
                    upsampled = F.interpolate(logits, size=gt.shape, mode="bilinear", align_corners=False)
                    out.append((upsampled[0, 0] > model.mask_threshold).cpu().numpy())
            else:
                upsampled = model.postprocess_masks(
                    sam_logits, features.input_sizes[i], features.original_sizes[i]
                )
                sam_masks.append((upsampled[0, 0] > model.mask_threshold).cpu().numpy())
                hq_masks.append(hq[i].masks[0])
    return sam_masks, hq_masks, [float(refinement.scores[0]) for refinement in hq]


@torch.inference_mode()
def sam_low_res_logits(
    refiner: BoxRefiner, features: EncodedImages, image: int, boxes: np.ndarray
) -> torch.Tensor:
    """SAM's own (N, 1, 256, 256) single-mask logits for (N, 4) XYXY boxes of one encoded image.

    segment_anything's MaskDecoder forward on the HQ decoder's SAM weights (the HQ decoder
    subclasses it and leaves its tokens, transformer and heads untouched): exactly plain SAM.
    """
    model = refiner.model
    model_boxes = refiner.transform.apply_boxes_torch(
        torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4), features.original_sizes[image]
    ).to(refiner.device)
    autocast = refiner._autocast() if hasattr(refiner, "_autocast") else contextlib.nullcontext()
    with autocast:  # the refiner's precision, as its HQ decode
        sparse, dense = model.prompt_encoder(points=None, boxes=model_boxes, masks=None)
        logits, _ = MaskDecoder.forward(
            model.mask_decoder,
            image_embeddings=features.embeddings[image : image + 1],
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
    return logits.float()


def summarize(per_sample: dict[str, list[float | None]]) -> dict[str, float]:
    """Means over samples: "<name>_iou" -> "<name>_miou", "<name>_biou" -> "<name>_mbiou" (any other
    key -> "<key>_mean"). None entries are skipped; a key with no values is left out. Fractions in [0, 1]."""
    summary = {}
    for key, values in per_sample.items():
        present = [float(v) for v in values if v is not None]
        if not present:
            continue
        if key.endswith("_biou"):
            name = key[: -len("_biou")] + "_mbiou"
        elif key.endswith("_iou"):
            name = key[: -len("_iou")] + "_miou"
        else:
            name = f"{key}_mean"
        summary[name] = float(np.mean(present))
    return summary
