"""The HQ-SAM model: SAM's modules plus the HQ head, with the early ViT feature captured by a hook."""

from __future__ import annotations

from collections.abc import Callable

import torch
from segment_anything.modeling import PromptEncoder, Sam
from torch import nn

from hqsam.hqsam_core.mask_decoder_hq import MaskDecoderHQ


class HQSam(Sam):
    """SAM with an HQ mask decoder; its state dict has exactly the official checkpoint's keys.

    `early_layer` names the encoder submodule whose output is the early feature (the first
    global-attention block for ViTs), read with a forward hook so SAM's encoder code is untouched.
    """

    mask_decoder: MaskDecoderHQ

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoderHQ,
        *,
        variant: str,
        early_layer: str,
        early_to_nchw: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__(
            image_encoder=image_encoder,
            prompt_encoder=prompt_encoder,
            mask_decoder=mask_decoder,
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
        self.variant = variant
        self.early_layer = early_layer
        self._early_to_nchw = early_to_nchw

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed (B, 3, 1024, 1024) -> embeddings (B, 256, 64, 64), HQ features (B, 32, 256, 256)."""
        embeddings, early = self.image_features(images)
        return embeddings, self.mask_decoder.hq_features(embeddings, early)

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen encoder's outputs: embeddings (B, 256, 64, 64) and the early feature (B, C, 64, 64)."""
        captured: list[torch.Tensor] = []
        layer = self.image_encoder.get_submodule(self.early_layer)
        handle = layer.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
        try:
            embeddings = self.image_encoder(images)
        finally:
            handle.remove()
        return embeddings, self._early_to_nchw(captured[0])

    def forward(self, *args, **kwargs):
        raise TypeError("HQSam has no single forward; use hqsam_core.BoxRefiner (encode + decode).")
