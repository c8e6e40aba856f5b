"""The official HQ-SAM training recipe as small, separately tested pieces (no Ray here).

Per sample (REFERENCE section 3, SysCV/sam-hq train/train.py and train/utils):
  `large_scale_jitter` (horizontal flip + large-scale jitter to 1024) -> `sample_prompt` (one of tight
  box / 10 positive points / noisy mask, uniformly) -> `preprocess_batch` -> `hq_logits` (frozen SAM
  without gradients, HQ-only logits) -> `point_sampled_loss` (PointRend-style BCE + dice).
`freeze_sam_` leaves `requires_grad` on the five HQ modules only; those are what `make_optimizer` gets
(Adam, lr 1e-3, no weight decay, StepLR x0.1 at epoch 10 in the official recipe). `augment` is the
per-sample recipe and `train_step` one optimizer step, as every training worker runs them;
`load_base` / `check_base` build or check the frozen base with its HQ head.

Coordinate frame: every prompt is in the pixel frame of the 1024x1024 jittered image, pixel (x, y)
being column x, row y, as the official trainer feeds them to SAM's prompt encoder.

For DistributedDataParallel wrap `HQTrainingModule(model)` (its forward is `hq_logits`) rather than
calling `hq_logits` on a DDP-wrapped model: DDP synchronises gradients only through its own forward.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hqsam.hqsam_core.arrays import writable
from hqsam.hqsam_core.build import build_hqsam, check_checkpoint
from hqsam.hqsam_core.hqsam import HQSam
from hqsam.hqsam_core.mask_decoder_hq import HQ_MODULES
from hqsam.hqsam_core.masks import tight_box_inclusive

PROMPT_KINDS = ("box", "points", "mask")
NUM_POINTS = 10  # positive points per point prompt, as the official trainer
MASK_INPUT_SIZE = 256  # SAM's mask-prompt resolution (4x the 64x64 embedding)
MASK_INPUT_ON = 255.0  # value of a foreground pixel in a mask prompt, as the official trainer


@dataclass
class Prompt:
    """One prompt for one training sample, in the 1024x1024 input frame.

    - kind "box": `box` (4,) float32 XYXY, the tight box of the mask as the official
      `masks_to_boxes`: (min column, min row, max column, max row) of foreground pixels, inclusive.
    - kind "points": `points` (10, 2) float32 XY pixel indices of foreground pixels, all positive.
    - kind "mask": `mask` (256, 256) float32 with values in {0., 255.}: the official trainer feeds the
      noisy mask to SAM's `mask_input` as 0/255 (not as logits), so SAM's mask downscaling sees
      255 for foreground and 0 for background. Do not pass logits here: heads trained with this
      recipe expect the 0/255 scale.
    """

    kind: str
    box: np.ndarray | None = None
    points: np.ndarray | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.kind not in PROMPT_KINDS:
            raise ValueError(f"prompt kind must be one of {PROMPT_KINDS}, got {self.kind!r}")
        field = {"box": self.box, "points": self.points, "mask": self.mask}[self.kind]
        if field is None:
            raise ValueError(f"a {self.kind!r} prompt needs its {self.kind} array")


# ---------------------------------------------------------------------------------------------------
# Augmentation


def _resize_bilinear(array: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """HxW or HxWxC array -> (C, h, w) float32 tensor, bilinear without antialiasing (as F.interpolate
    in the official transforms: half-pixel centres, align_corners=False)."""
    tensor = torch.from_numpy(writable(np.ascontiguousarray(array))).float()
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    return F.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False)[0]


def large_scale_jitter(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int = 1024,
    scale_range: tuple[float, float] = (0.1, 2.0),
    flip_p: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Official augmentation: horizontal flip, then large-scale jitter to a `size` x `size` canvas.

    HxWx3 uint8 image + HxW mask -> (size, size, 3) uint8 padded with 128 and (size, size) bool padded
    with False. Steps (train/utils/dataloader.py RandomHFlip + LargeScaleJitter): flip with probability
    `flip_p`; draw s uniformly in `scale_range`; resize, aspect kept, so the longest side becomes
    round(s * size) (bilinear, no antialiasing); crop a random `size` x `size` window where the
    result is larger; pad right/bottom. The image is rounded back to uint8 (the official trainer
    truncates). The mask is resized like the image, as 0/1 floats, and thresholded at 0.5: the
    official trainer keeps that soft label as its loss target and thresholds it at 128 of 255 for
    the prompts; here both use the thresholded mask.
    Random draws, in order: rng.random() (flip), rng.uniform (scale), rng.integers (crop row, column).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    if rng.random() < flip_p:
        image, mask = image[:, ::-1], mask[:, ::-1]
    height, width = mask.shape
    target = round(float(rng.uniform(*scale_range)) * size)
    scale = min(target / height, target / width)
    scaled = (max(1, round(height * scale)), max(1, round(width * scale)))

    crop_h, crop_w = min(size, scaled[0]), min(size, scaled[1])
    top = int(rng.integers(0, scaled[0] - crop_h + 1))
    left = int(rng.integers(0, scaled[1] - crop_w + 1))

    resized_image = _resize_bilinear(image, scaled)[:, top : top + crop_h, left : left + crop_w]
    resized_mask = _resize_bilinear(mask.astype(np.float32), scaled)[
        0, top : top + crop_h, left : left + crop_w
    ]

    out_image = np.full((size, size, 3), 128, dtype=np.uint8)
    out_image[:crop_h, :crop_w] = resized_image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    out_mask = np.zeros((size, size), dtype=bool)
    out_mask[:crop_h, :crop_w] = (resized_mask > 0.5).numpy()
    return out_image, out_mask


# ---------------------------------------------------------------------------------------------------
# Prompts


def noisy_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The official noisy mask prompt (train/utils/misc.py masks_noise), (256, 256) float32 in {0, 255}.

    The mask is resized to 256x256 (bilinear, values in [0, 1]); its "incoherent" band is where it
    differs by >= 0.01 from itself resized to 1/8 and back (bilinear both ways), i.e. near the
    boundary; standard normal noise is added there and the result thresholded at 0.5.
    """
    small = _resize_bilinear(mask.astype(np.float32), (MASK_INPUT_SIZE, MASK_INPUT_SIZE))[None]
    coarse = F.interpolate(small, size=(MASK_INPUT_SIZE // 8,) * 2, mode="bilinear", align_corners=False)
    recovered = F.interpolate(coarse, size=(MASK_INPUT_SIZE,) * 2, mode="bilinear", align_corners=False)
    band = ((small - recovered).abs() >= 0.01)[0, 0].numpy()
    noise = rng.standard_normal((MASK_INPUT_SIZE, MASK_INPUT_SIZE)).astype(np.float32)
    noisy = (small[0, 0].numpy() + noise * band) > 0.5
    return noisy.astype(np.float32) * MASK_INPUT_ON


def sample_prompt(mask: np.ndarray, rng: np.random.Generator) -> Prompt:
    """One prompt for a (1024, 1024) bool mask, its kind drawn uniformly from box / points / mask.

    As the official trainer: the box is tight (no noise); the points are 10 distinct foreground
    pixels, all positive; the mask is `noisy_mask`. A mask with fewer than 10 foreground pixels
    cannot give points and draws from box / mask (the official trainer drops points for such a
    batch); an empty mask (e.g. the object jittered out of the crop) always gets the (empty) mask
    prompt, whose target is then empty too.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected an HxW mask, got shape {mask.shape}")
    area = int(np.count_nonzero(mask))
    kinds = PROMPT_KINDS if area >= NUM_POINTS else ("box", "mask") if area else ("mask",)
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "box":
        return Prompt("box", box=tight_box_inclusive(mask))
    if kind == "points":
        rows, cols = np.nonzero(mask)
        chosen = rng.choice(area, size=NUM_POINTS, replace=False)
        return Prompt("points", points=np.stack([cols[chosen], rows[chosen]], axis=1).astype(np.float32))
    return Prompt("mask", mask=noisy_mask(mask, rng))


# ---------------------------------------------------------------------------------------------------
# Loss


def _point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of (B, 1, H, W) maps at (B, P, 2) xy coordinates in [0, 1] -> (B, P).

    Same sampling as PointRend's point_sample: grid_sample, align_corners=False, zeros outside.
    """
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # (B, P, 1, 2)
    return F.grid_sample(maps, grid, mode="bilinear", align_corners=False)[:, 0, :, 0]


def _uniform(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, device=generator.device, generator=generator).to(device)


def sample_points(
    logits: torch.Tensor,
    *,
    num_points: int = 112 * 112,
    oversample_ratio: float = 3.0,
    importance_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PointRend importance sampling: (B, 1, h, w) logits -> (B, num_points, 2) xy in [0, 1].

    Draws int(num_points * oversample_ratio) uniform points, keeps the int(importance_ratio *
    num_points) most uncertain (uncertainty -|logit| of the bilinearly sampled logit) and adds
    uniform points for the rest. Random draws, in order: the oversampled points, then the rest.
    A `generator` on another device than the logits draws there and the points are moved.
    """
    if not 0.0 <= importance_ratio <= 1.0 or oversample_ratio < 1.0:
        raise ValueError("need 0 <= importance_ratio <= 1 and oversample_ratio >= 1")
    batch = logits.shape[0]
    num_oversampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_ratio * num_points)
    candidates = _uniform((batch, num_oversampled, 2), logits.device, generator)
    uncertainty = -_point_sample(logits.detach().float(), candidates).abs()
    chosen = uncertainty.topk(num_uncertain, dim=1).indices
    coords = candidates.gather(1, chosen.unsqueeze(-1).expand(-1, -1, 2))
    if num_points > num_uncertain:
        extra = _uniform((batch, num_points - num_uncertain, 2), logits.device, generator)
        coords = torch.cat([coords, extra], dim=1)
    return coords


def point_sampled_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    num_points: int = 112 * 112,
    oversample_ratio: float = 3.0,
    importance_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official `loss_masks` (train/utils/loss_mask.py): (B,1,h,w) logits vs (B,1,H,W) {0,1} targets.

    Points come from `sample_points` (normalized coordinates, so logits and targets may differ in
    size); logits and targets are sampled bilinearly there. Per mask: BCE-with-logits averaged over
    its points, and dice 1 - (2 sum(p t) + 1) / (sum p + sum t + 1) with p = sigmoid(logit). Both are
    summed over the batch and divided by the number of masks B (= the official num_masks, the local
    batch size), so each is the mean per mask. The total loss is bce + dice. Computed in float32.
    """
    if logits.ndim != 4 or logits.shape[1] != 1 or targets.ndim != 4 or targets.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"expected (B,1,h,w) logits and (B,1,H,W) targets, got {logits.shape} and {targets.shape}"
        )
    num_masks = logits.shape[0]
    with torch.no_grad():
        coords = sample_points(
            logits,
            num_points=num_points,
            oversample_ratio=oversample_ratio,
            importance_ratio=importance_ratio,
            generator=generator,
        )
        point_targets = _point_sample(targets.float(), coords)
    point_logits = _point_sample(logits.float(), coords)
    bce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none").mean(1)
    probs = point_logits.sigmoid()
    dice = 1 - (2 * (probs * point_targets).sum(1) + 1) / (probs.sum(1) + point_targets.sum(1) + 1)
    return bce.sum() / num_masks, dice.sum() / num_masks


# ---------------------------------------------------------------------------------------------------
# Model


def _hq_sam(model: nn.Module) -> HQSam:
    if isinstance(model, HQTrainingModule):
        return model.model
    if isinstance(model, HQSam):
        return model
    if isinstance(getattr(model, "module", None), (HQSam, HQTrainingModule)):
        raise TypeError(
            "got a wrapped model (e.g. DistributedDataParallel): wrap HQTrainingModule(model) in DDP and "
            "call the wrapper, or pass the bare HQSam (its .module) where no gradient sync is needed."
        )
    raise TypeError(f"expected an HQSam, got {type(model).__name__}")


def hq_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of the five HQ modules, in a fixed order (those the official recipe trains)."""
    decoder = _hq_sam(model).mask_decoder
    return [param for name in HQ_MODULES for param in getattr(decoder, name).parameters()]


def freeze_sam_(model: nn.Module) -> list[torch.nn.Parameter]:
    """Set requires_grad on the HQ modules only (every SAM weight frozen); returns the trainable ones.

    These are exactly the parameters whose state-dict keys satisfy `checkpoint.is_hq_key`.
    """
    for param in _hq_sam(model).parameters():
        param.requires_grad_(False)
    trainable = hq_parameters(model)
    for param in trainable:
        param.requires_grad_(True)
    return trainable


def preprocess_batch(model: nn.Module, images: list[np.ndarray]) -> torch.Tensor:
    """(1024, 1024, 3) uint8 RGB images -> (B, 3, 1024, 1024) normalized (and padded) float32 tensor
    on the model's device (`model.preprocess`, i.e. SAM's pixel mean/std)."""
    sam = _hq_sam(model)
    if not images:
        raise ValueError("no images")
    for image in images:
        if (
            image.ndim != 3
            or image.shape[2] != 3
            or image.dtype != np.uint8
            or image.shape != images[0].shape
        ):
            raise ValueError(f"expected equal-sized HxWx3 uint8 images, got {image.dtype} {image.shape}")
    batch = torch.from_numpy(np.stack(images)).to(sam.device, non_blocking=True)
    return sam.preprocess(batch.permute(0, 3, 1, 2).float())


def _encoder_outputs(
    sam: HQSam, images: torch.Tensor, autocast_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen encoder without gradients, always in eval mode (TinyViT's BatchNorm keeps its
    statistics even while the trainer has the model in train mode)."""
    encoder = sam.image_encoder
    was_training = encoder.training
    encoder.eval()
    autocast = (
        torch.autocast(images.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        with torch.no_grad(), autocast:
            embeddings, early = sam.image_features(images)
    finally:
        encoder.train(was_training)
    return embeddings.float(), early.float()


def hq_logits(
    model: nn.Module,
    images: torch.Tensor,
    prompts: list[Prompt],
    *,
    encoder_autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """Training forward, as the official trainer: HQ-only logits (B, 1, 256, 256) for prompt b on image b.

    `images` (B, 3, 1024, 1024) are already preprocessed (`preprocess_batch`). The frozen encoder
    and the prompt encoder run under torch.no_grad (the encoder in eval mode, optionally under
    autocast to `encoder_autocast`, e.g. torch.bfloat16, its outputs cast back to float32); the HQ
    fusion and the decoder run with autograd, so gradients reach the trainable HQ modules through
    the frozen decoder. multimask_output=False, hq_token_only=True. Prompts of different kinds are
    decoded in one decoder call per kind and returned in the input order.
    """
    sam = _hq_sam(model)
    if images.ndim != 4 or images.shape[0] != len(prompts) or not prompts:
        raise ValueError(f"{len(prompts)} prompts for images of shape {tuple(images.shape)}")
    embeddings, early = _encoder_outputs(sam, images, encoder_autocast)
    hq_features = sam.mask_decoder.hq_features(embeddings, early)
    device = embeddings.device
    image_pe = sam.prompt_encoder.get_dense_pe()

    parts, order = [], []
    for kind in PROMPT_KINDS:
        index = [b for b, prompt in enumerate(prompts) if prompt.kind == kind]
        if not index:
            continue
        with torch.no_grad():
            sparse, dense = sam.prompt_encoder(**_prompt_inputs(kind, [prompts[b] for b in index], device))
        logits, _ = sam.mask_decoder(
            image_embeddings=embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            hq_features=hq_features,
            image_index=torch.tensor(index, device=device),
            multimask_output=False,
            hq_token_only=True,
        )
        parts.append(logits)
        order.extend(index)
    logits = torch.cat(parts)
    if order != sorted(order):
        logits = logits[torch.argsort(torch.tensor(order, device=device))]
    return logits


def _prompt_inputs(kind: str, prompts: list[Prompt], device: torch.device) -> dict:
    """SAM prompt-encoder arguments for prompts of one kind."""
    if kind == "box":
        boxes = np.stack([np.asarray(p.box, dtype=np.float32).reshape(4) for p in prompts])
        return {"points": None, "boxes": torch.from_numpy(boxes).to(device), "masks": None}
    if kind == "points":
        coords = torch.from_numpy(np.stack([np.asarray(p.points, dtype=np.float32) for p in prompts])).to(
            device
        )
        if coords.ndim != 3 or coords.shape[2] != 2:
            raise ValueError(f"point prompts must be (N, 2) arrays, got {tuple(coords.shape[1:])}")
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=device)
        return {"points": (coords, labels), "boxes": None, "masks": None}
    masks = np.stack([np.asarray(p.mask, dtype=np.float32) for p in prompts])
    if masks.shape[1:] != (MASK_INPUT_SIZE, MASK_INPUT_SIZE):
        raise ValueError(f"mask prompts must be {MASK_INPUT_SIZE}x{MASK_INPUT_SIZE}, got {masks.shape[1:]}")
    return {"points": None, "boxes": None, "masks": torch.from_numpy(masks[:, None]).to(device)}


class HQTrainingModule(nn.Module):
    """An nn.Module whose forward is `hq_logits`, to wrap in DistributedDataParallel.

    DDP only syncs parameters with requires_grad (the HQ modules after `freeze_sam_`); all of them
    are used in every forward, so find_unused_parameters can stay False.
    """

    def __init__(self, model: HQSam) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: torch.Tensor, prompts: list[Prompt], encoder_autocast: torch.dtype | None = None
    ) -> torch.Tensor:
        return hq_logits(self.model, images, prompts, encoder_autocast=encoder_autocast)


# ---------------------------------------------------------------------------------------------------
# The recipe as a training worker runs it


def sample_seed(seed: int, epoch: int, key: str) -> list[int]:
    """Per-sample, per-epoch RNG seed: augmentation independent of order and thread."""
    return [seed, epoch, zlib.crc32(key.encode())]


def augment(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, Prompt]:
    """The official per-sample recipe: flip + large-scale jitter to 1024, then one random prompt."""
    image, mask = large_scale_jitter(image, mask, rng)
    return image, mask, sample_prompt(mask, rng)


def train_step(
    net: nn.Module,
    sam: nn.Module,
    optimizer: torch.optim.Optimizer,
    samples: Sequence[tuple[np.ndarray, np.ndarray, Prompt]],
    *,
    encoder_autocast: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One optimizer step on (image 1024x1024x3 uint8, mask 1024x1024 bool, Prompt) samples.

    `net` is `HQTrainingModule(sam)`, or that wrapped in DDP. Returns [loss, bce, dice] (detached).
    """
    images = preprocess_batch(sam, [s[0] for s in samples])
    targets = torch.from_numpy(np.stack([s[1] for s in samples])[:, None]).to(images.device).float()
    logits = net(images, [s[2] for s in samples], encoder_autocast)
    bce, dice = point_sampled_loss(logits, targets, generator=generator)
    loss = bce + dice
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return torch.stack([loss, bce, dice]).detach()


def make_optimizer(
    params: Sequence[torch.nn.Parameter], lr: float, lr_drop_epoch: int
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.StepLR]:
    """Adam without weight decay, lr x0.1 after `lr_drop_epoch` epochs (scheduler stepped per epoch)."""
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, lr_drop_epoch), gamma=0.1)
    return optimizer, scheduler


def load_base(model: str, checkpoint: str, hq_head: str | None, *, seed: int | None = None) -> HQSam:
    """BASE with its HQ head (or `hq_head`, or a fresh head for a plain SAM BASE, seeded by `seed` so
    that every worker starts from the same one)."""
    if seed is not None:
        torch.manual_seed(seed)
    with _fresh_head_expected():
        return build_hqsam(model, checkpoint, hq_head, allow_random_hq_head=True)


def check_base(model: str, checkpoint: str, hq_head: str | None) -> None:
    """Raise CheckpointError unless `load_base` would load these weights (allocates no model)."""
    with _fresh_head_expected():
        check_checkpoint(model, checkpoint, hq_head, allow_random_hq_head=True)


@contextlib.contextmanager
def _fresh_head_expected() -> Iterator[None]:
    """build_hqsam warns that a plain SAM checkpoint leaves the HQ head random ("testing only"):
    for training that head is the one to train, so the warning is not shown."""
    build_log = logging.getLogger("hqsam.hqsam_core.build")
    level = build_log.level
    build_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        build_log.setLevel(level)
