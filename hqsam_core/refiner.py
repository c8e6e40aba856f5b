"""Batched box-prompted refinement: many images, any number of boxes each, in one call.

On CPU, by default, everything is the official HQ-SAM computation in fp32 (PIL resize, SAM's
attention): masks, logits and scores equal the official predictor's. On CUDA the defaults take the
fast path (issue 7): bf16 autocast, fused attention, the resize and normalisation on the GPU
(antialiased bilinear `F.interpolate`, not PIL, so CUDA masks are close to but not bit-identical with
the CPU path), pinned-memory uploads, and upsampling + thresholding on the GPU with bit-packed masks
coming back to the host. Each part is also a keyword option.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from hqsam.hqsam_core import crop_zoom as cz
from hqsam.hqsam_core.arrays import writable
from hqsam.hqsam_core.fast_attention import set_attention
from hqsam.hqsam_core.hqsam import HQSam

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
        return cls(pack_masks(masks), height, width, logits, scores, crops)

    @property
    def masks(self) -> np.ndarray:
        """(N, H, W) bool masks at the image's size, unpacked anew on each access."""
        return unpack_masks(self.packed_masks, self.height, self.width)


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, ceil(H*W/8)) uint8, `np.packbits` of each mask's pixels."""
    n, height, width = masks.shape
    return np.packbits(masks.reshape(n, height * width), axis=1)


def unpack_masks(packed: np.ndarray, height: int, width: int) -> np.ndarray:
    """`pack_masks` undone: (N, ceil(H*W/8)) uint8 -> (N, H, W) bool."""
    bits = np.unpackbits(packed, axis=1, count=height * width)
    return bits.view(bool).reshape(len(packed), height, width)


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
        if self.device.type == "cuda":
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
        """Pinned upload, then resize (antialiased bilinear, rounded to uint8 levels like PIL's
        output), normalise and pad on the device."""
        uploaded = [_pinned(image).to(self.device, non_blocking=True) for image in images]
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
        boxes = torch.as_tensor(writable(boxes), dtype=torch.float32).reshape(-1, 4)
        image_index = torch.as_tensor(writable(image_index), dtype=torch.long).reshape(-1)
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
            chunk_boxes, chunk_index = _pad_rows(
                model_boxes[chunk], image_index[chunk], self.max_prompts if self.pad_prompts else len(chunk)
            )
            with self._autocast():
                sparse, dense = self.model.prompt_encoder(
                    points=None, boxes=chunk_boxes.to(self.device, non_blocking=True), masks=None
                )
                chunk_logits, chunk_scores = self.model.mask_decoder(
                    image_embeddings=features.embeddings,
                    image_pe=self.model.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    hq_features=features.hq_features,
                    image_index=chunk_index.to(self.device, non_blocking=True),
                    multimask_output=multimask_output,
                    hq_token_only=hq_token_only,
                )
            logits.append(chunk_logits[: len(chunk), 0])
            scores.append(chunk_scores[: len(chunk)])
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
        """Upsample one image's low-res logits to its size in fp32 and threshold, chunk by chunk;
        the masks leave the device bit-packed (numpy packs CPU masks faster than torch does)."""
        height, width = original_size
        masks = (
            self.model.postprocess_masks(part.float()[:, None], input_size, original_size)[:, 0]
            > self.model.mask_threshold
            for part in logits.split(self.max_prompts)
        )
        if self.device.type == "cuda":  # only the bits cross to the host
            packed = [packbits(part).cpu().numpy() for part in masks]
        else:
            packed = [pack_masks(part.cpu().numpy()) for part in masks]
        packed = np.concatenate(packed) if packed else np.zeros((0, -(-height * width // 8)), np.uint8)
        return Refinement(
            packed_masks=packed,
            height=height,
            width=width,
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
        crop_zoom: float | None = None,
        crop_context: float = cz.DEFAULT_CONTEXT,
    ) -> list[Refinement]:
        """Refine each image's (N_i, 4) XYXY pixel boxes; images without boxes are not encoded.

        With `crop_zoom` (e.g. 0.25), a box whose longer side is below `crop_zoom` x its image's
        longer side is refined on a crop around it (margin `crop_context` x the box's longer side
        each side, see `hqsam_core.crop_zoom`), resized to the model's input like any image, and its
        mask pasted back at the image's size. Crops are encoded in batches of at most len(images).
        """
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images but {len(boxes)} box arrays")
        boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
        options = {"hq_token_only": hq_token_only, "multimask_output": multimask_output}
        if crop_zoom is None:
            return self._refine_whole(images, boxes, **options)
        if crop_zoom <= 0:
            raise ValueError("crop_zoom must be positive")
        return self._refine_zoomed(images, boxes, crop_zoom, crop_context, options)

    def _refine_whole(
        self, images: Sequence[np.ndarray], boxes: list[np.ndarray], **options
    ) -> list[Refinement]:
        with_boxes = [i for i, b in enumerate(boxes) if len(b)]
        features = self.encode([images[i] for i in with_boxes])
        decoded = self.decode(
            features,
            np.concatenate([boxes[i] for i in with_boxes]) if with_boxes else np.zeros((0, 4), np.float32),
            np.repeat(np.arange(len(with_boxes)), [len(boxes[i]) for i in with_boxes]),
            **options,
        )
        results = [_empty_refinement(image.shape[:2]) for image in images]
        for position, refinement in zip(with_boxes, decoded):
            results[position] = refinement
        return results

    def _refine_zoomed(
        self,
        images: Sequence[np.ndarray],
        boxes: list[np.ndarray],
        crop_zoom: float,
        context: float,
        options: dict,
    ) -> list[Refinement]:
        # Plan: which boxes go on a crop (and which crop); the rest are refined on the whole image.
        windows: list[list[cz.CropWindow | None]] = []
        for image, image_boxes in zip(images, boxes):
            size = image.shape[:2]
            selected = cz.zoom_selection(image_boxes, size, crop_zoom)
            image_windows = []
            for box, zoom in zip(image_boxes, selected):
                window = cz.crop_window(box, size, context=context) if zoom else None
                if window is not None and (window.width, window.height) == (size[1], size[0]):
                    window = None  # the crop is the whole image: nothing to zoom
                image_windows.append(window)
            windows.append(image_windows)
        plain = [b[np.array([w is None for w in ws], dtype=bool)] for b, ws in zip(boxes, windows)]
        whole = self._refine_whole(images, plain, **options)

        jobs = [(i, k, w) for i, ws in enumerate(windows) for k, w in enumerate(ws) if w is not None]
        zoomed: dict[tuple[int, int], tuple[Refinement, cz.CropWindow]] = {}
        for group in _batches(jobs, max(1, len(images))):
            crops = [cz.crop_image(images[i], w) for i, _, w in group]
            crop_boxes = [cz.box_to_crop(boxes[i][k : k + 1], w) for i, k, w in group]
            for (i, k, w), result in zip(group, self._refine_whole(crops, crop_boxes, **options)):
                zoomed[(i, k)] = (result, w)

        return [
            _merge(
                image.shape[:2], windows[i], whole[i], [zoomed.get((i, k)) for k in range(len(windows[i]))]
            )
            for i, image in enumerate(images)
        ]


def _merge(
    size: tuple[int, int],
    windows: list[cz.CropWindow | None],
    whole: Refinement,
    zoomed: list[tuple[Refinement, cz.CropWindow] | None],
) -> Refinement:
    """One image's results in its boxes' order: those refined on the whole image as they are, the
    zoomed ones with their crop's mask pasted back at the image's size."""
    height, width = size
    n = len(windows)
    out = Refinement(
        packed_masks=np.zeros((n, -(-height * width // 8)), np.uint8),
        height=height,
        width=width,
        logits=np.zeros((n, 256, 256), dtype=np.float32),
        scores=np.zeros((n,), dtype=np.float32),
        crops=np.full((n, 4), -1, dtype=np.int64),
    )
    rows = np.array([w is None for w in windows], dtype=bool)
    out.packed_masks[rows] = whole.packed_masks
    out.logits[rows] = whole.logits
    out.scores[rows] = whole.scores
    for k in np.flatnonzero(~rows):
        result, w = zoomed[k]
        mask = np.zeros((1, height, width), dtype=bool)
        mask[0, w.y0 : w.y1, w.x0 : w.x1] = result.masks[0]
        out.packed_masks[k] = pack_masks(mask)[0]
        out.logits[k], out.scores[k], out.crops[k] = result.logits[0], result.scores[0], w.as_array()
    return out


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


def _pad_rows(boxes: torch.Tensor, index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a chunk to `size` rows with copies of its last row (keeps image indexes sorted)."""
    missing = size - len(boxes)
    if missing <= 0:
        return boxes, index
    return torch.cat([boxes, boxes[-1:].expand(missing, 4)]), torch.cat([index, index[-1:].expand(missing)])


def _pinned(image: np.ndarray) -> torch.Tensor:
    """A copy of `image` in pinned memory, in one copy; a read-only array (a Ray Data batch's) is
    read, never shared, so torch has nothing to warn about."""
    pinned = torch.empty(image.shape, dtype=torch.uint8, pin_memory=True)
    pinned.numpy()[...] = image
    return pinned


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _empty_refinement(size: tuple[int, int]) -> Refinement:
    return Refinement.from_masks(
        np.zeros((0, *size), dtype=bool),
        logits=np.zeros((0, 256, 256), dtype=np.float32),
        scores=np.zeros((0,), dtype=np.float32),
    )
