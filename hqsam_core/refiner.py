"""Batched box-prompted refinement: many images, any number of boxes each, in one call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from hqsam_core.hqsam import HQSam


@dataclass
class Refinement:
    """Results for one image's N boxes."""

    masks: np.ndarray  # (N, H, W) bool, at the image's size
    logits: np.ndarray  # (N, 256, 256) float32 low-res logits
    scores: np.ndarray  # (N,) float32 predicted IoU


@dataclass
class EncodedImages:
    """Per-image encoder outputs of one `encode` call."""

    embeddings: torch.Tensor  # (B, 256, 64, 64)
    hq_features: torch.Tensor  # (B, 32, 256, 256)
    input_sizes: list[tuple[int, int]]  # size after resizing the longest side to 1024
    original_sizes: list[tuple[int, int]]


class BoxRefiner:
    """Runs HQ-SAM on boxes of many images: one encoder batch, decoder batches over all prompts.

    `max_prompts` bounds the prompts per decoder call, and with it the decoder's memory.
    """

    def __init__(self, model: HQSam, device: str | torch.device = "cpu", *, max_prompts: int = 64) -> None:
        if max_prompts < 1:
            raise ValueError("max_prompts must be at least 1.")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.max_prompts = max_prompts
        self.transform = ResizeLongestSide(model.image_encoder.img_size)

    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray]) -> EncodedImages:
        """Encode HxWx3 uint8 RGB images of any sizes in one batch."""
        batch, input_sizes, original_sizes = [], [], []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
            resized = torch.as_tensor(self.transform.apply_image(image), device=self.device)
            resized = resized.permute(2, 0, 1).contiguous()
            batch.append(self.model.preprocess(resized))
            input_sizes.append(tuple(resized.shape[-2:]))
            original_sizes.append(tuple(image.shape[:2]))
        if not batch:
            empty = torch.empty(0, device=self.device)
            return EncodedImages(empty, empty, [], [])
        embeddings, hq_features = self.model.encode(torch.stack(batch))
        return EncodedImages(embeddings, hq_features, input_sizes, original_sizes)

    @torch.inference_mode()
    def decode(
        self,
        features: EncodedImages,
        boxes: np.ndarray | torch.Tensor,
        image_index: np.ndarray | torch.Tensor,
        *,
        hq_token_only: bool = False,
        multimask_output: bool = False,
    ) -> list[Refinement]:
        """Decode (N, 4) XYXY pixel boxes, box k belonging to image `image_index[k]` of `features`.

        Returns one `Refinement` per encoded image, its boxes in the order given.
        """
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        image_index = torch.as_tensor(image_index, dtype=torch.long).reshape(-1)
        if len(boxes) != len(image_index):
            raise ValueError(f"{len(boxes)} boxes but {len(image_index)} image indexes")
        num_images = len(features.original_sizes)
        if len(image_index) and (image_index.min() < 0 or image_index.max() >= num_images):
            raise ValueError(f"image_index out of range for {num_images} encoded images")
        model_boxes = torch.empty_like(boxes)
        for i in image_index.unique().tolist():
            selected = image_index == i
            model_boxes[selected] = self.transform.apply_boxes_torch(
                boxes[selected], features.original_sizes[i]
            )
        # A stable sort by image keeps each image's boxes in the caller's order and makes
        # every image's prompts contiguous, so per-image results are plain splits.
        order = torch.argsort(image_index, stable=True)
        logits, scores = [], []
        for chunk in order.split(self.max_prompts) if len(order) else ():
            sparse, dense = self.model.prompt_encoder(
                points=None, boxes=model_boxes[chunk].to(self.device), masks=None
            )
            chunk_logits, chunk_scores = self.model.mask_decoder(
                image_embeddings=features.embeddings,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                hq_features=features.hq_features,
                image_index=image_index[chunk].to(self.device),
                multimask_output=multimask_output,
                hq_token_only=hq_token_only,
            )
            logits.append(chunk_logits[:, 0])
            scores.append(chunk_scores)
        counts = torch.bincount(image_index, minlength=num_images).tolist()
        all_logits = torch.cat(logits) if logits else torch.empty(0, 256, 256, device=self.device)
        all_scores = torch.cat(scores) if scores else torch.empty(0, device=self.device)
        return [
            self._finish(image_logits, image_scores, input_size, original_size)
            for image_logits, image_scores, input_size, original_size in zip(
                all_logits.split(counts),
                all_scores.split(counts),
                features.input_sizes,
                features.original_sizes,
            )
        ]

    def _finish(
        self,
        logits: torch.Tensor,
        scores: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> Refinement:
        """Upsample one image's low-res logits to its size and threshold, chunk by chunk."""
        masks = [
            self.model.postprocess_masks(part[:, None], input_size, original_size)[:, 0]
            > self.model.mask_threshold
            for part in logits.split(self.max_prompts)
        ]
        return Refinement(
            masks=torch.cat(masks).cpu().numpy() if masks else np.zeros((0, *original_size), dtype=bool),
            logits=logits.float().cpu().numpy(),
            scores=scores.float().cpu().numpy(),
        )

    def refine(
        self,
        images: Sequence[np.ndarray],
        boxes: Sequence[np.ndarray],
        *,
        hq_token_only: bool = False,
        multimask_output: bool = False,
    ) -> list[Refinement]:
        """Refine each image's (N_i, 4) XYXY pixel boxes; images without boxes are not encoded."""
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images but {len(boxes)} box arrays")
        boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
        with_boxes = [i for i, b in enumerate(boxes) if len(b)]
        features = self.encode([images[i] for i in with_boxes])
        decoded = self.decode(
            features,
            np.concatenate([boxes[i] for i in with_boxes]) if with_boxes else np.zeros((0, 4), np.float32),
            np.repeat(np.arange(len(with_boxes)), [len(boxes[i]) for i in with_boxes]),
            hq_token_only=hq_token_only,
            multimask_output=multimask_output,
        )
        results = [_empty_refinement(image.shape[:2]) for image in images]
        for position, refinement in zip(with_boxes, decoded):
            results[position] = refinement
        return results


def _empty_refinement(size: tuple[int, int]) -> Refinement:
    return Refinement(
        masks=np.zeros((0, *size), dtype=bool),
        logits=np.zeros((0, 256, 256), dtype=np.float32),
        scores=np.zeros((0,), dtype=np.float32),
    )
