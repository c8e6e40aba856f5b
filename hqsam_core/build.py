"""Registry of HQ-SAM model builders, one per variant, and checkpoint loading."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, PromptEncoder, TwoWayTransformer

from hqsam.hqsam_core.checkpoint import CheckpointError, hq_keys, merge_checkpoint, read_state_dict
from hqsam.hqsam_core.fast_attention import ATTENTION_KINDS, set_attention
from hqsam.hqsam_core.hqsam import HQSam
from hqsam.hqsam_core.mask_decoder_hq import MaskDecoderHQ
from hqsam.hqsam_core.random_weights import RANDOM_WEIGHTS_SEED, is_random_weights, randomize_
from hqsam.hqsam_core.tiny_vit import TinyViT, early_feature_to_nchw
from hqsam.hqsam_core.variants import VARIANTS
from hqsam.hqsam_core.zoo import shown_source

log = logging.getLogger(__name__)

PROMPT_DIM = 256
IMAGE_SIZE = 1024
PATCH_SIZE = 16


@dataclass(frozen=True)
class ViTSpec:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]


VIT_SPECS = {
    "vit_b": ViTSpec(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": ViTSpec(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": ViTSpec(1280, 32, 16, (7, 15, 23, 31)),
}


def _decoder(vit_dim: int) -> MaskDecoderHQ:
    return MaskDecoderHQ(
        transformer_dim=PROMPT_DIM,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=2048, num_heads=8),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        vit_dim=vit_dim,
    )


def _prompt_encoder() -> PromptEncoder:
    grid = IMAGE_SIZE // PATCH_SIZE
    return PromptEncoder(
        embed_dim=PROMPT_DIM,
        image_embedding_size=(grid, grid),
        input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
        mask_in_chans=16,
    )


def _channels_last_to_nchw(feature: torch.Tensor) -> torch.Tensor:
    return feature.permute(0, 3, 1, 2)


def _build_vit(variant: str) -> HQSam:
    spec = VIT_SPECS[variant]
    encoder = ImageEncoderViT(
        depth=spec.depth,
        embed_dim=spec.embed_dim,
        img_size=IMAGE_SIZE,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=spec.num_heads,
        patch_size=PATCH_SIZE,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec.global_attn_indexes,
        window_size=14,
        out_chans=PROMPT_DIM,
    )
    return HQSam(
        encoder,
        _prompt_encoder(),
        _decoder(spec.embed_dim),
        variant=variant,
        early_layer=f"blocks.{spec.global_attn_indexes[0]}",
        early_to_nchw=_channels_last_to_nchw,
    )


def _build_vit_tiny(variant: str = "vit_tiny") -> HQSam:
    return HQSam(
        TinyViT(),
        _prompt_encoder(),
        _decoder(160),
        variant=variant,
        early_layer="layers.1",
        early_to_nchw=early_feature_to_nchw,
    )


MODEL_REGISTRY: dict[str, Callable[[str], HQSam]] = {
    "vit_b": _build_vit,
    "vit_l": _build_vit,
    "vit_h": _build_vit,
    "vit_tiny": _build_vit_tiny,
}  # one builder per entry of VARIANTS (tests/test_variants.py)


def build_hqsam(
    variant: str,
    checkpoint: str | None = None,
    hq_head: str | None = None,
    *,
    allow_random_hq_head: bool = False,
    attention: str = "sam",
) -> HQSam:
    """Build an HQ-SAM model in eval mode, loading official-format weights when given.

    `checkpoint` is an HQ-SAM checkpoint, or a plain SAM one together with `hq_head` (a file of
    HQ keys). Sources may be paths, fsspec URIs or zoo names, each optionally pinned to its
    sha256 (`SOURCE#sha256=HEX`, see hqsam_core.zoo). `checkpoint="random"` gives random weights
    of one fixed seed (the same model in every process: a dry run without the official files; its
    masks are meaningless). Without `checkpoint` the weights are PyTorch's default initialisation.
    A plain SAM checkpoint without `hq_head` is refused unless `allow_random_hq_head`.
    `attention` is "sam" (SAM's own attention modules: the official computation) or "sdpa"
    (`hqsam_core.fast_attention.FusedAttention`: same parameters and keys, fused kernels); it
    concerns SAM ViT encoders only (vit_tiny's TinyViT keeps its own attention).
    """
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {attention!r}")
    random = is_random_weights(checkpoint)
    model = _random_model(variant, hq_head) if random else _construct(variant)
    set_attention(model.image_encoder, attention)
    if checkpoint is not None and not random:
        model.load_state_dict(_checked_state(model, checkpoint, hq_head, allow_random_hq_head), strict=True)
    elif hq_head is not None and not random:
        raise ValueError("hq_head needs a base checkpoint.")
    return model.eval()


def _random_model(variant: str, hq_head: str | None) -> HQSam:
    """The variant with the random weights of RANDOM_WEIGHTS_SEED: the same in every process."""
    _refuse_head_for_random_weights(hq_head)
    log.warning("%s has random weights: its masks are meaningless (a dry run only).", variant)
    with torch.random.fork_rng(devices=[]):
        # Seeded construction too: some buffers are drawn there (the prompt encoder's Fourier features).
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        return randomize_(_construct(variant), seed=RANDOM_WEIGHTS_SEED)


def check_checkpoint(
    variant: str, checkpoint: str, hq_head: str | None = None, *, allow_random_hq_head: bool = False
) -> None:
    """Raise CheckpointError unless build_hqsam would load these weights; allocates no model."""
    if is_random_weights(checkpoint):
        _refuse_head_for_random_weights(hq_head)
        return
    with torch.device("meta"):
        model = _construct(variant)
    _checked_state(model, checkpoint, hq_head, allow_random_hq_head)


def _refuse_head_for_random_weights(hq_head: str | None) -> None:
    if hq_head is not None:
        raise CheckpointError(
            f"random weights take no HQ head ({shown_source(hq_head)}): leave out the head, or pass "
            "a real checkpoint to combine it with."
        )


def _construct(variant: str) -> HQSam:
    if variant not in MODEL_REGISTRY:
        raise ValueError(f"Unknown model variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    return MODEL_REGISTRY[variant](variant)


def _checked_state(model: HQSam, checkpoint: str, hq_head: str | None, allow_random_hq_head: bool) -> dict:
    variant = model.variant
    base = read_state_dict(checkpoint)
    head = read_state_dict(hq_head) if hq_head is not None else None
    # Messages name the sources without credentials, signatures or pins.
    checkpoint, hq_head = shown_source(checkpoint), hq_head and shown_source(hq_head)
    state, head_is_random = merge_checkpoint(model, base, head, checkpoint, hq_head, variant)
    if head_is_random:
        if not allow_random_hq_head:
            raise CheckpointError(
                f"{checkpoint} is a plain SAM checkpoint without the HQ head; pass --hq-head FILE "
                f"(a head trained with `hqsam train`) or an HQ-SAM checkpoint such as sam_hq_{variant}."
            )
        log.warning("%s has no HQ head: the HQ head keeps random weights (testing only).", checkpoint)
        state.update({k: v for k, v in model.state_dict().items() if k in hq_keys(model)})
    return state
