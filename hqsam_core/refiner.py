"""Batched box-prompted refinement: many images, any number of boxes each, in one call.

On CPU, by default, everything is the official HQ-SAM computation in fp32 (PIL resize, SAM's
attention): masks, logits and scores equal the official predictor's. On CUDA the defaults take the
fast path (issue 7): bf16 autocast, fused attention, the resize and normalisation on the GPU
(antialiased bilinear `F.interpolate`, not PIL, so CUDA masks are close to but not bit-identical with
the CPU path), pinned-memory uploads, and upsampling + thresholding on the GPU with bit-packed masks
coming back to the host. Each part is also a keyword option, and each runs on any device: the CPU
tests run the GPU's code.

`refine` returns every box's mask and logits at once; `refine_chunks` hands them out one decoder
call (`max_prompts` boxes) at a time, so what a caller holds need not grow with the box count.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from hqsam.hqsam_core import crop_zoom as cz
from hqsam.hqsam_core.arrays import writable
from hqsam.hqsam_core.fast_attention import set_attention
from hqsam.hqsam_core.hqsam import HQSam
from hqsam.hqsam_core.masks import remove_small_regions
from hqsam.hqsam_core.metrics import paired_iou

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_TARGETS = ("decoder", "all")


@dataclass
class Refinement:
    """Results for one image's N boxes.

    Masks are kept bit-packed, in the form the pipeline writes them from (`np.packbits` of each
    mask's H*W pixels in row-major order); `masks` unpacks them on demand.
    """

    packed_masks: np.ndarray  # (N, ceil(H*W/8)) uint8
    height: int  # the image's size, which is each mask's
    width: int
    logits: np.ndarray  # (N, 256, 256) float32 low-res logits
    scores: np.ndarray  # (N,) float32 predicted IoU
    # (N,) float32: each mask's stability score (IoU of its logits thresholded at +1 and -1, as
    # segment_anything.utils.amg.calculate_stability_score) and IoU with SAM's own mask for the same
    # prompt; see `quality`
    stability: np.ndarray | None = None
    sam_hq_iou: np.ndarray | None = None
    # With crop_zoom: (N, 4) int64 XYXY crop window [x0, y0, x1, y1) each box was refined on, -1 for
    # boxes refined on the whole image. A zoomed box's logits are in its crop's frame. None when
    # refine was called without crop_zoom.
    crops: np.ndarray | None = None

    @classmethod
    def from_masks(
        cls, masks: np.ndarray, logits: np.ndarray, scores: np.ndarray, crops: np.ndarray | None = None
    ) -> Refinement:
        """A Refinement of (N, H, W) bool masks."""
        _, height, width = masks.shape
        return cls(pack_masks(masks), height, width, logits, scores, crops=crops)

    @property
    def masks(self) -> np.ndarray:
        """(N, H, W) bool masks at the image's size, unpacked anew on each access."""
        return unpack_masks(self.packed_masks, self.height, self.width)


@dataclass
class RefinedChunk:
    """Some of one image's results, handed out as soon as the decoder call that made them returns;
    `refine_chunks` yields them so a caller keeps only what it needs (packed masks, scores)."""

    image: int  # the image's position among the call's images
    rows: np.ndarray  # (n,) int: these boxes' positions among the image's boxes
    packed_masks: np.ndarray  # (n, ceil(H*W/8)) uint8, as in `Refinement`
    scores: np.ndarray  # (n,) float32 predicted IoU
    stability: np.ndarray  # (n,) float32, as in `Refinement`
    sam_hq_iou: np.ndarray  # (n,) float32, as in `Refinement`
    logits: np.ndarray | None = None  # (n, 256, 256) float32 when asked for
    crops: np.ndarray | None = None  # (n, 4) crop windows with crop_zoom, as in `Refinement`


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, ceil(H*W/8)) uint8, `np.packbits` of each mask's pixels."""
    n, height, width = masks.shape
    return np.packbits(masks.reshape(n, height * width), axis=1)


def unpack_masks(packed: np.ndarray, height: int, width: int) -> np.ndarray:
    """`pack_masks` undone: (N, ceil(H*W/8)) uint8 -> (N, H, W) bool."""
    bits = np.unpackbits(packed, axis=1, count=height * width)
    return bits.view(bool).reshape(len(packed), height, width)


@dataclass
class PromptSet:
    """N prompts over a call's encoded images, in the images' pixels: each a box, and optionally
    points and a dense mask prompt. Every prompt has the same number of points; label -1 pads."""

    boxes: torch.Tensor  # (N, 4) float32 XYXY
    image_index: torch.Tensor  # (N,) int64: the encoded image each prompt belongs to
    point_coords: torch.Tensor | None = None  # (N, P, 2) float32 XY
    point_labels: torch.Tensor | None = None  # (N, P) int64: 1 foreground, 0 background, -1 padding
    mask_inputs: torch.Tensor | None = None  # (N, 256, 256) float32 logits in the model's input frame

    @classmethod
    def checked(
        cls,
        boxes: np.ndarray | torch.Tensor,
        image_index: np.ndarray | torch.Tensor,
        num_images: int,
        point_coords: np.ndarray | torch.Tensor | None = None,
        point_labels: np.ndarray | torch.Tensor | None = None,
        mask_inputs: np.ndarray | torch.Tensor | None = None,
    ) -> PromptSet:
        """Prompts as tensors; ValueError unless their shapes agree and indexes name the images."""
        boxes = torch.as_tensor(writable(boxes), dtype=torch.float32).reshape(-1, 4)
        image_index = torch.as_tensor(writable(image_index), dtype=torch.long).reshape(-1)
        n = len(boxes)
        if n != len(image_index):
            raise ValueError(f"{n} boxes but {len(image_index)} image indexes")
        if n and (image_index.min() < 0 or image_index.max() >= num_images):
            raise ValueError(f"image_index out of range for {num_images} encoded images")
        if (point_coords is None) != (point_labels is None):
            raise ValueError("points need their labels, and labels their points")
        if point_coords is not None:
            point_coords = torch.as_tensor(writable(point_coords), dtype=torch.float32)
            point_labels = torch.as_tensor(writable(point_labels), dtype=torch.long)
            if point_coords.shape[:1] != (n,) or point_coords.ndim != 3 or point_coords.shape[2] != 2:
                raise ValueError(f"points must be ({n}, P, 2), got {tuple(point_coords.shape)}")
            if point_labels.shape != point_coords.shape[:2]:
                raise ValueError(f"point labels must be {tuple(point_coords.shape[:2])}")
        if mask_inputs is not None:
            mask_inputs = torch.as_tensor(writable(mask_inputs), dtype=torch.float32)
            if mask_inputs.shape != (n, 256, 256):
                raise ValueError(f"mask prompts must be ({n}, 256, 256), got {tuple(mask_inputs.shape)}")
        return cls(boxes, image_index, point_coords, point_labels, mask_inputs)

    @classmethod
    def of_images(
        cls,
        boxes: list[np.ndarray],
        points: list[np.ndarray] | None = None,
        point_labels: list[np.ndarray] | None = None,
        mask_inputs: list[np.ndarray] | None = None,
    ) -> PromptSet:
        """One PromptSet of per-image lists (image i's prompts get image_index i)."""

        def joined(parts: list[np.ndarray] | None, shape: tuple[int, ...]) -> np.ndarray | None:
            if parts is None:
                return None
            return np.concatenate(parts) if parts else np.zeros(shape, np.float32)

        index = np.repeat(np.arange(len(boxes)), [len(b) for b in boxes])
        count = 0 if points is None or not points else points[0].shape[1]
        return cls.checked(
            joined(boxes, (0, 4)),
            index,
            len(boxes),
            joined(points, (0, count, 2)),
            joined(point_labels, (0, count)),
            joined(mask_inputs, (0, 256, 256)),
        )

    def take(self, rows: torch.Tensor) -> PromptSet:
        """The prompts at `rows`, in that order."""

        def part(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[rows]

        return PromptSet(
            self.boxes[rows],
            self.image_index[rows],
            part(self.point_coords),
            part(self.point_labels),
            part(self.mask_inputs),
        )

    def padded(self, size: int) -> PromptSet:
        """Padded to `size` prompts with copies of the last one (image indexes stay sorted)."""
        missing = size - len(self.boxes)
        if missing <= 0:
            return self
        return self.take(
            torch.cat([torch.arange(len(self.boxes)), torch.full((missing,), len(self.boxes) - 1)])
        )


@dataclass
class EncodedImages:
    """Per-image encoder outputs of one `encode` call."""

    embeddings: torch.Tensor  # (B, 256, 64, 64)
    hq_features: torch.Tensor  # (B, 32, 256, 256)
    input_sizes: list[tuple[int, int]]  # size after resizing the longest side to 1024
    original_sizes: list[tuple[int, int]]


class BoxRefiner:
    """Runs HQ-SAM on boxes of many images: one encoder batch, decoder batches over all prompts.

    `max_prompts` bounds the prompts per decoder call, and with it the decoder's memory (default: 64
    on CUDA; 16 elsewhere, where larger calls fall out of the CPU caches and run slower);
    `encoder_batch` the images per encoder forward (default: 32 on CUDA, 1 elsewhere).

    Options (None = the device's default):
    - `precision`: "fp32", "bf16" or "fp16" autocast for the encoder and decoder (default bf16 on
      CUDA, fp32 elsewhere); upsampling to the image size and the threshold always run in fp32.
    - `attention`: "sdpa" (fused, `hqsam_core.fast_attention`) or "sam" (the official module) for
      SAM ViT encoders, switched in place on the model (default "sdpa" on CUDA; on other devices the
      model is left as built, which is "sam" unless `build_hqsam(attention=...)` said otherwise).
    - `compile`: False, True / "decoder" (torch.compile of the decoder's heavy modules), or "all"
      (also each encoder block); compiled with dynamic=False, the inductor cache in
      $TORCHINDUCTOR_CACHE_DIR (default $HQSAM_CACHE/inductor) so the first-batch cost is paid once.
    - `pad_prompts`: pad every decoder chunk to `max_prompts` prompts (repeats of its last prompt,
      dropped afterwards) so shapes never change; default: on when compiling.
    - `on_device`: resize (antialiased bilinear, not PIL), normalise, threshold and bit-pack on the
      model's device, so that only images go up and only bits come down (default on CUDA, where the
      upload is pinned); off: PIL resize and numpy packing, as the official predictor.
    """

    def __init__(
        self,
        model: HQSam,
        device: str | torch.device = "cpu",
        *,
        max_prompts: int | None = None,
        encoder_batch: int | None = None,
        precision: str | None = None,
        attention: str | None = None,
        compile: bool | str = False,
        pad_prompts: bool | None = None,
        on_device: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        max_prompts = (64 if cuda else 16) if max_prompts is None else max_prompts
        if max_prompts < 1:
            raise ValueError("max_prompts must be at least 1.")
        precision = precision or ("bf16" if cuda else "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        compile_target = _compile_target(compile)
        self.model = model.to(self.device).eval()
        self.max_prompts = max_prompts
        # A GPU gains from batching the encoder; a CPU runs one image at a time faster (cache-bound).
        self.encoder_batch = encoder_batch or (32 if cuda else 1)
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.precision = precision
        attention = attention or ("sdpa" if cuda else None)
        if attention is not None:
            set_attention(self.model.image_encoder, attention)
        self.attention = attention
        self.compile = compile_target
        self.pad_prompts = compile_target is not None if pad_prompts is None else bool(pad_prompts)
        self.on_device = cuda if on_device is None else bool(on_device)
        if compile_target is not None:
            compile_model(self.model, compile_target)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray]) -> EncodedImages:
        """Encode HxWx3 uint8 RGB images of any sizes in one batch."""
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
        if not len(images):
            empty = torch.empty(0, device=self.device)
            return EncodedImages(empty, empty, [], [])
        original_sizes = [tuple(image.shape[:2]) for image in images]
        if self.on_device:
            batch, input_sizes = self._preprocess_on_device(images)
        else:
            batch, input_sizes = [], []
            for image in images:
                resized = torch.as_tensor(self.transform.apply_image(image), device=self.device)
                resized = resized.permute(2, 0, 1).contiguous()
                batch.append(self.model.preprocess(resized))
                input_sizes.append(tuple(resized.shape[-2:]))
        outputs = []
        with self._autocast():
            for start in range(0, len(batch), self.encoder_batch):
                outputs.append(self.model.encode(torch.stack(batch[start : start + self.encoder_batch])))
        embeddings = torch.cat([embedding for embedding, _ in outputs])
        hq_features = torch.cat([features for _, features in outputs])
        return EncodedImages(embeddings, hq_features, input_sizes, original_sizes)

    def _preprocess_on_device(self, images: Sequence[np.ndarray]) -> tuple[list[torch.Tensor], list]:
        """Upload (pinned to CUDA), then resize (antialiased bilinear, rounded to uint8 levels like
        PIL's output), normalise and pad on the device."""
        uploaded = [_uploaded(image, self.device) for image in images]
        batch, input_sizes = [], []
        for pixels in uploaded:
            h, w = pixels.shape[:2]
            size = self.transform.get_preprocess_shape(h, w, self.transform.target_length)
            x = pixels.permute(2, 0, 1)[None].float()
            if (h, w) != tuple(size):
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
                x = x.round_().clamp_(0, 255)
            batch.append(self.model.preprocess(x[0]))
            input_sizes.append(tuple(size))
        return batch, input_sizes

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
        prompts = PromptSet.checked(boxes, image_index, len(features.original_sizes))
        options = {"hq_token_only": hq_token_only, "multimask_output": multimask_output}
        chunks = self._decoded_chunks(features, prompts, with_logits=True, **options)
        counts = torch.bincount(prompts.image_index, minlength=len(features.original_sizes)).tolist()
        return _gather(chunks, counts, features.original_sizes)

    @torch.inference_mode()
    def decode_low_res(
        self, features: EncodedImages, prompts: PromptSet, *, hq_token_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Low-res logits (N, 256, 256), SAM's own logits (N, 256, 256) and scores (N,) of N prompts,
        in the order given, on the model's device: for callers that combine several decodes (guided
        prompts average trials) before `finish`."""
        logits, sam_logits, scores = [], [], []
        order = torch.argsort(prompts.image_index, stable=True)
        for chunk in order.split(self.max_prompts):
            chunk_logits, chunk_sam, chunk_scores = self._decode_prompts(
                features, self._model_frame(features, prompts.take(chunk)), hq_token_only=hq_token_only
            )
            logits.append(chunk_logits.float())
            sam_logits.append(chunk_sam.float())
            scores.append(chunk_scores.float())
        if not len(order):
            empty = torch.zeros((0, 256, 256), device=self.device)
            return empty, empty, torch.zeros(0, device=self.device)
        inverse = torch.argsort(order.to(self.device))
        return torch.cat(logits)[inverse], torch.cat(sam_logits)[inverse], torch.cat(scores)[inverse]

    def _model_frame(self, features: EncodedImages, prompts: PromptSet) -> PromptSet:
        """The prompts' boxes and points in the model's 1024-pixel input frame of their images."""
        boxes = torch.empty_like(prompts.boxes)
        coords = None if prompts.point_coords is None else torch.empty_like(prompts.point_coords)
        for i in prompts.image_index.unique().tolist():
            selected = prompts.image_index == i
            size = features.original_sizes[i]
            boxes[selected] = self.transform.apply_boxes_torch(prompts.boxes[selected], size)
            if coords is not None:
                coords[selected] = self.transform.apply_coords_torch(prompts.point_coords[selected], size)
        return replace(prompts, boxes=boxes, point_coords=coords)

    @torch.inference_mode()
    def _decoded_chunks(
        self,
        features: EncodedImages,
        prompts: PromptSet,
        *,
        with_logits: bool,
        min_region_area: int = 0,
        **options,
    ) -> Iterator[RefinedChunk]:
        """One decoder call per `max_prompts` prompts, each call's results handed out at once."""
        image_index = prompts.image_index
        # A stable sort by image keeps each image's prompts in the caller's order and makes
        # every image's prompts contiguous, so per-image results are plain splits.
        order = torch.argsort(image_index, stable=True)
        sorted_index = image_index[order]
        # Each prompt's position among its image's prompts: its place minus its image's first place.
        rows = torch.arange(len(order), device=order.device) - torch.searchsorted(sorted_index, sorted_index)
        chunks = zip(order.split(self.max_prompts), rows.split(self.max_prompts)) if len(order) else ()
        for chunk, chunk_rows in chunks:
            chunk_prompts = self._model_frame(features, prompts.take(chunk))
            logits, sam_logits, scores = self._decode_prompts(features, chunk_prompts, **options)
            images, sizes = torch.unique_consecutive(image_index[chunk], return_counts=True)
            sizes = sizes.tolist()
            for i, image_logits, image_sam, image_scores, image_rows in zip(
                images.tolist(),
                logits.split(sizes),
                sam_logits.split(sizes),
                scores.split(sizes),
                chunk_rows.split(sizes),
            ):
                yield self.finish(
                    features,
                    i,
                    image_rows.cpu().numpy(),
                    image_logits,
                    image_sam,
                    image_scores,
                    with_logits=with_logits,
                    min_region_area=min_region_area,
                )

    def _decode_prompts(
        self,
        features: EncodedImages,
        prompts: PromptSet,
        *,
        hq_token_only: bool,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder call: (n, 256, 256) low-res logits, SAM's own logits and (n,) scores of n
        prompts, given in the model's input frame."""
        n = len(prompts.boxes)
        padded = prompts.padded(self.max_prompts if self.pad_prompts else n)
        device = self.device
        points = None
        if padded.point_coords is not None:
            points = (
                padded.point_coords.to(device, non_blocking=True),
                padded.point_labels.to(device, non_blocking=True),
            )
        masks = (
            None if padded.mask_inputs is None else padded.mask_inputs[:, None].to(device, non_blocking=True)
        )
        with self._autocast():
            sparse, dense = self.model.prompt_encoder(
                points=points, boxes=padded.boxes.to(device, non_blocking=True), masks=masks
            )
            logits, scores, sam_logits = self.model.mask_decoder(
                image_embeddings=features.embeddings,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                hq_features=features.hq_features,
                image_index=padded.image_index.to(device, non_blocking=True),
                multimask_output=multimask_output,
                hq_token_only=hq_token_only,
                with_sam_logits=True,
            )
        return logits[:n, 0], sam_logits[:n, 0], scores[:n]

    def finish(
        self,
        features: EncodedImages,
        image: int,
        rows: np.ndarray,
        logits: torch.Tensor,
        sam_logits: torch.Tensor,
        scores: torch.Tensor,
        *,
        with_logits: bool = False,
        min_region_area: int = 0,
    ) -> RefinedChunk:
        """Upsample some of one image's low-res logits to its size in fp32, threshold, rate, and
        clean the masks (`min_region_area`); the masks leave the device bit-packed (numpy packs
        CPU masks faster than torch does)."""
        input_size, original_size = features.input_sizes[image], features.original_sizes[image]
        threshold = self.model.mask_threshold
        upscaled = self.model.postprocess_masks(logits.float()[:, None], input_size, original_size)[:, 0]
        masks = upscaled > threshold
        stability = stability_scores(upscaled, threshold)
        del upscaled
        sam_masks = self.model.postprocess_masks(sam_logits.float()[:, None], input_size, original_size)[:, 0]
        sam_masks = sam_masks > threshold
        if min_region_area > 0:  # OpenCV's connected components run on the host
            cleaned = remove_small_regions(masks.cpu().numpy(), min_region_area)
            masks = torch.as_tensor(cleaned, device=sam_masks.device)
        sam_hq_iou = paired_iou(masks, sam_masks).float()
        if self.on_device:  # only the bits cross to the host
            packed = packbits(masks).cpu().numpy()
        else:
            packed = pack_masks(masks.cpu().numpy())
        return RefinedChunk(
            image=image,
            rows=rows,
            packed_masks=packed,
            scores=scores.float().cpu().numpy(),
            stability=stability.cpu().numpy(),
            sam_hq_iou=sam_hq_iou.cpu().numpy(),
            logits=logits.float().cpu().numpy() if with_logits else None,
        )

    def refine(
        self,
        images: Sequence[np.ndarray],
        boxes: Sequence[np.ndarray],
        *,
        points: Sequence[np.ndarray] | None = None,
        point_labels: Sequence[np.ndarray] | None = None,
        mask_inputs: Sequence[np.ndarray] | None = None,
        hq_token_only: bool = False,
        multimask_output: bool = False,
        crop_zoom: float | None = None,
        crop_context: float = cz.DEFAULT_CONTEXT,
        min_region_area: int = 0,
    ) -> list[Refinement]:
        """Refine each image's (N_i, 4) XYXY pixel boxes; images without boxes are not encoded.

        Each box may come with points (`points[i]` (N_i, P, 2) XY pixels, `point_labels[i]` (N_i, P):
        1 foreground, 0 background, -1 padding; the same P throughout a call) and a dense mask prompt
        (`mask_inputs[i]` (N_i, 256, 256) low-res logits in the model's input frame, as the official
        predictor's `mask_input`). `min_region_area` removes holes and islands smaller than that many
        pixels from each mask (`hqsam_core.masks.remove_small_regions`).

        With `crop_zoom` (e.g. 0.25; boxes alone), a box whose longer side is below `crop_zoom` x
        its image's longer side is refined on a crop around it (margin `crop_context` x the box's
        longer side each side, see `hqsam_core.crop_zoom`), resized to the model's input like any
        image, and its mask pasted back at the image's size. Crops are encoded in batches of at most
        len(images).
        """
        chunks = self.refine_chunks(
            images,
            boxes,
            points=points,
            point_labels=point_labels,
            mask_inputs=mask_inputs,
            hq_token_only=hq_token_only,
            multimask_output=multimask_output,
            crop_zoom=crop_zoom,
            crop_context=crop_context,
            min_region_area=min_region_area,
            with_logits=True,
        )
        sizes = [image.shape[:2] for image in images]
        return _gather(chunks, [len(b) for b in boxes], sizes, crops=crop_zoom is not None)

    def refine_chunks(
        self,
        images: Sequence[np.ndarray],
        boxes: Sequence[np.ndarray],
        *,
        points: Sequence[np.ndarray] | None = None,
        point_labels: Sequence[np.ndarray] | None = None,
        mask_inputs: Sequence[np.ndarray] | None = None,
        hq_token_only: bool = False,
        multimask_output: bool = False,
        crop_zoom: float | None = None,
        crop_context: float = cz.DEFAULT_CONTEXT,
        min_region_area: int = 0,
        with_logits: bool = False,
    ) -> Iterator[RefinedChunk]:
        """`refine`'s results as they are decoded, one `RefinedChunk` per decoder call and image
        (per zoomed box with `crop_zoom`), in no promised order: what a caller keeps of each is all
        that grows with the box count. Logits only `with_logits`."""
        boxes = _checked_boxes(images, boxes, crop_zoom)
        extras = _checked_extras(boxes, points, point_labels, mask_inputs)
        if crop_zoom is not None and any(extra is not None for extra in extras):
            raise ValueError("crop_zoom refines box prompts only, not points or mask prompts")
        options = {
            "hq_token_only": hq_token_only,
            "multimask_output": multimask_output,
            "min_region_area": min_region_area,
            "with_logits": with_logits,
        }

        def whole(some_images: Sequence[np.ndarray], some_boxes: list[np.ndarray]) -> Iterator[RefinedChunk]:
            return self._whole_chunks(some_images, some_boxes, extras, **options)

        if crop_zoom is None:
            return whole(images, boxes)
        return self._zoomed_chunks(images, boxes, crop_zoom, crop_context, whole)

    def _whole_chunks(
        self,
        images: Sequence[np.ndarray],
        boxes: list[np.ndarray],
        extras: tuple[list[np.ndarray] | None, ...] = (None, None, None),
        **options,
    ) -> Iterator[RefinedChunk]:
        """Each image refined as a whole; images without boxes are not encoded."""
        with_boxes = [i for i, b in enumerate(boxes) if len(b)]
        features = self.encode([images[i] for i in with_boxes])
        prompts = PromptSet.of_images(
            [boxes[i] for i in with_boxes], *[_select(e, with_boxes) for e in extras]
        )
        for chunk in self._decoded_chunks(features, prompts, **options):
            yield replace(chunk, image=with_boxes[chunk.image])

    def _zoomed_chunks(
        self,
        images: Sequence[np.ndarray],
        boxes: list[np.ndarray],
        crop_zoom: float,
        context: float,
        whole: Callable[[Sequence[np.ndarray], list[np.ndarray]], Iterable[RefinedChunk]],
    ) -> Iterator[RefinedChunk]:
        """Boxes too small for their image refined on crops (`whole` refines whole images or crops):
        the others as they are, the zoomed ones with their crop's mask pasted back at the image's size."""
        windows = [_zoom_windows(image.shape[:2], b, crop_zoom, context) for image, b in zip(images, boxes)]
        plain_rows = [np.flatnonzero([w is None for w in ws]) for ws in windows]
        for chunk in whole(images, [b[rows] for b, rows in zip(boxes, plain_rows)]):
            crops = np.full((len(chunk.rows), 4), -1, dtype=np.int64)
            yield replace(chunk, rows=plain_rows[chunk.image][chunk.rows], crops=crops)
        jobs = [(i, k, w) for i, ws in enumerate(windows) for k, w in enumerate(ws) if w is not None]
        for group in _batches(jobs, max(1, len(images))):
            crops = [cz.crop_image(images[i], w) for i, _, w in group]
            crop_boxes = [cz.box_to_crop(boxes[i][k : k + 1], w) for i, k, w in group]
            for chunk in whole(crops, crop_boxes):
                i, k, window = group[chunk.image]
                yield _pasted(chunk, i, k, window, images[i].shape[:2])


def _checked_boxes(
    images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], crop_zoom: float | None
) -> list[np.ndarray]:
    """Each image's boxes as (N_i, 4) float32; ValueError on a count mismatch or a bad crop_zoom."""
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} box arrays")
    if crop_zoom is not None and crop_zoom <= 0:
        raise ValueError("crop_zoom must be positive")
    return [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]


def _checked_extras(
    boxes: list[np.ndarray],
    points: Sequence[np.ndarray] | None,
    point_labels: Sequence[np.ndarray] | None,
    mask_inputs: Sequence[np.ndarray] | None,
) -> tuple[list[np.ndarray] | None, ...]:
    """Per-image points, labels and mask prompts as arrays sized to each image's boxes."""
    if (points is None) != (point_labels is None):
        raise ValueError("points need their labels, and labels their points")
    checked = []
    for name, values, dtype, shape in (
        ("points", points, np.float32, (2,)),
        ("point_labels", point_labels, np.int64, ()),
        ("mask_inputs", mask_inputs, np.float32, (256, 256)),
    ):
        if values is None:
            checked.append(None)
            continue
        if len(values) != len(boxes):
            raise ValueError(f"{len(boxes)} box arrays but {len(values)} {name} arrays")
        arrays = [np.asarray(v, dtype) for v in values]
        for b, array in zip(boxes, arrays):
            if len(array) != len(b) or (len(b) and shape and array.shape[-len(shape) :] != shape):
                raise ValueError(f"{name}: {len(b)} boxes but an array of shape {array.shape}")
        checked.append(arrays)
    if points is not None and len({a.shape[1] for a, b in zip(checked[0], boxes) if len(b)}) > 1:
        raise ValueError("every box of one call needs the same number of points (pad with label -1)")
    return tuple(checked)


def _select(values: list[np.ndarray] | None, indexes: list[int]) -> list[np.ndarray] | None:
    return None if values is None else [values[i] for i in indexes]


def stability_scores(logits: torch.Tensor, threshold: float = 0.0, offset: float = 1.0) -> torch.Tensor:
    """(N,) stability of (N, H, W) mask logits: IoU of the masks thresholded at threshold +- offset,
    as segment_anything.utils.amg.calculate_stability_score (NaN where both are empty)."""
    inner = (logits > threshold + offset).flatten(1).sum(1, dtype=torch.int32)
    outer = (logits > threshold - offset).flatten(1).sum(1, dtype=torch.int32)
    return inner.float() / outer.float()


def _zoom_windows(
    size: tuple[int, int], boxes: np.ndarray, crop_zoom: float, context: float
) -> list[cz.CropWindow | None]:
    """Each box's crop window, None for a box refined on the whole image."""
    windows = []
    for box, zoom in zip(boxes, cz.zoom_selection(boxes, size, crop_zoom)):
        window = cz.crop_window(box, size, context=context) if zoom else None
        if window is not None and (window.width, window.height) == (size[1], size[0]):
            window = None  # the crop is the whole image: nothing to zoom
        windows.append(window)
    return windows


def _pasted(
    chunk: RefinedChunk, image: int, row: int, window: cz.CropWindow, size: tuple[int, int]
) -> RefinedChunk:
    """A crop's one-box chunk as box `row` of image `image`, its mask pasted back at the image's size."""
    mask = np.zeros((1, *size), dtype=bool)
    mask[0, window.y0 : window.y1, window.x0 : window.x1] = unpack_masks(
        chunk.packed_masks, window.height, window.width
    )[0]
    return replace(
        chunk,
        image=image,
        rows=np.array([row]),
        packed_masks=pack_masks(mask),
        crops=window.as_array()[None],
    )


def _gather(
    chunks: Iterable[RefinedChunk],
    counts: Sequence[int],
    sizes: Sequence[tuple[int, int]],
    *,
    crops: bool = False,
) -> list[Refinement]:
    """One Refinement per image (`counts[i]` boxes of size `sizes[i]`) from its chunks."""
    results = [_blank_refinement(count, size, crops) for count, size in zip(counts, sizes)]
    for chunk in chunks:
        result = results[chunk.image]
        result.packed_masks[chunk.rows] = chunk.packed_masks
        result.logits[chunk.rows] = chunk.logits
        result.scores[chunk.rows] = chunk.scores
        result.stability[chunk.rows] = chunk.stability
        result.sam_hq_iou[chunk.rows] = chunk.sam_hq_iou
        if crops:
            result.crops[chunk.rows] = chunk.crops
    return results


def _blank_refinement(count: int, size: tuple[int, int], crops: bool = False) -> Refinement:
    height, width = size
    return Refinement(
        packed_masks=np.zeros((count, -(-height * width // 8)), np.uint8),
        height=height,
        width=width,
        logits=np.zeros((count, 256, 256), dtype=np.float32),
        scores=np.zeros((count,), dtype=np.float32),
        stability=np.zeros((count,), dtype=np.float32),
        sam_hq_iou=np.zeros((count,), dtype=np.float32),
        crops=np.full((count, 4), -1, dtype=np.int64) if crops else None,
    )


def packbits(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, ceil(H*W/8)) uint8 on the same device, bit order as `np.packbits`."""
    n, h, w = masks.shape
    flat = masks.reshape(n, h * w).to(torch.uint8)
    pad = (-h * w) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=masks.device)
    return (flat.view(n, (h * w + pad) // 8, 8) * weights).sum(-1, dtype=torch.uint8)


def compile_model(model: HQSam, target: str = "decoder") -> None:
    """torch.compile (dynamic=False) the decoder's heavy modules, and with "all" each encoder block.

    Compiles each module's `forward` in place (an instance attribute), so state-dict keys and the
    forward hook that captures the early ViT feature stay as they are. Shapes are fixed when the
    refiner pads prompts to `max_prompts`; the encoder recompiles once per distinct batch size.
    """
    if target not in COMPILE_TARGETS:
        raise ValueError(f"compile target must be one of {', '.join(COMPILE_TARGETS)}, got {target!r}")
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from hqsam.hqsam_core.zoo import cache_dir

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
    decoder = model.mask_decoder
    modules = [decoder.transformer, decoder.output_upscaling, decoder.embedding_maskfeature]
    if target == "all":
        encoder = model.image_encoder
        modules += list(getattr(encoder, "blocks", None) or getattr(encoder, "layers", None) or [encoder])
    for module in modules:
        if not getattr(module, "_hqsam_compiled", False):
            module.forward = torch.compile(module.forward, dynamic=False)
            module._hqsam_compiled = True


def _compile_target(option: bool | str | None) -> str | None:
    if option is None or option is False:
        return None
    if option is True:
        return "decoder"
    if option in COMPILE_TARGETS:
        return option
    raise ValueError(f"compile must be a bool or one of {', '.join(COMPILE_TARGETS)}, got {option!r}")


def _uploaded(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """`image` on `device`, through one copy into pinned memory when that is CUDA; a read-only array
    (a Ray Data batch's) is read, never shared, so torch has nothing to warn about."""
    copy = torch.empty(image.shape, dtype=torch.uint8, pin_memory=device.type == "cuda")
    copy.numpy()[...] = image
    return copy.to(device, non_blocking=True)


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
