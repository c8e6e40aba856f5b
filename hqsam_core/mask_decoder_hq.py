"""SAM's mask decoder plus the five HQ-SAM modules (the "HQ head")."""

from __future__ import annotations

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder
from torch import nn

HQ_MODULES = ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")


class MaskDecoderHQ(MaskDecoder):
    """SAM's decoder with the High-Quality output token and global-local feature fusion.

    Unlike the official decoder, one call decodes prompts of several images: `image_index`
    maps each prompt to its image, so every prompt reads its own image's embedding and HQ features.
    """

    def __init__(self, *, transformer_dim: int, transformer: nn.Module, vit_dim: int, **kwargs) -> None:
        super().__init__(transformer_dim=transformer_dim, transformer=transformer, **kwargs)
        dim = transformer_dim
        self.hf_token = nn.Embedding(1, dim)
        self.hf_mlp = MLP(dim, dim, dim // 8, 3)
        self.compress_vit_feat = nn.Sequential(
            nn.ConvTranspose2d(vit_dim, dim, kernel_size=2, stride=2),
            LayerNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim // 8, kernel_size=2, stride=2),
        )
        self.embedding_encoder = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
        )
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(dim // 8, dim // 4, 3, 1, 1),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.Conv2d(dim // 4, dim // 8, 3, 1, 1),
        )

    def hq_features(self, image_embeddings: torch.Tensor, early_features: torch.Tensor) -> torch.Tensor:
        """Global-local fusion: (B, 256, 64, 64) + (B, vit_dim, 64, 64) -> (B, 32, 256, 256)."""
        return self.embedding_encoder(image_embeddings) + self.compress_vit_feat(early_features)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        hq_features: torch.Tensor,
        image_index: torch.Tensor,
        multimask_output: bool = False,
        hq_token_only: bool = False,
        with_sam_logits: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Decode N prompts; returns low-res logits (N, 1, 256, 256) and scores (N,), and with
        `with_sam_logits` SAM's own mask token's logits (N, 1, 256, 256) as well.

        `image_embeddings` (B, C, h, w) and `hq_features` (B, 32, 4h, 4w) hold one entry per image;
        `image_index` (N,) says which image each prompt belongs to. Without `hq_token_only` the
        logits are SAM's plus the HQ token's, as in the official decoder.
        """
        num_sam_tokens = self.num_mask_tokens  # iou head scores these; the HQ token has no score
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight, self.hf_token.weight])
        n = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings], dim=1)

        src = image_embeddings[image_index] + dense_prompt_embeddings
        b, c, h, w = src.shape
        # image_pe is (1, C, h, w): the transformer broadcasts it instead of copying it per prompt.
        hs, src = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 2 + num_sam_tokens, :]
        upscaled_sam = self.output_upscaling(src.transpose(1, 2).view(b, c, h, w))

        iou_pred = self.iou_prediction_head(iou_token_out)
        if multimask_output:
            scores, best = iou_pred[:, 1:].max(dim=1)
            sam_token = best + 1
        else:
            scores = iou_pred[:, 0]
            sam_token = torch.zeros_like(image_index)

        upscaled_hq = self.embedding_maskfeature(upscaled_sam)
        _add_per_image_(upscaled_hq, hq_features, image_index)
        logits = _dot(self.hf_mlp(mask_tokens_out[:, num_sam_tokens]), upscaled_hq)
        sam_logits = None
        if with_sam_logits or not hq_token_only:
            sam_hyper = torch.stack(
                [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
            )
            chosen = sam_hyper[torch.arange(n, device=sam_hyper.device), sam_token]
            sam_logits = _dot(chosen, upscaled_sam)
        if not hq_token_only:
            logits = sam_logits + logits
        return (logits, scores, sam_logits) if with_sam_logits else (logits, scores)


def _dot(hyper: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Per-prompt hypernetwork weights (N, C) applied to features (N, C, H, W) -> (N, 1, H, W)."""
    n, c, h, w = features.shape
    return (hyper.unsqueeze(1) @ features.view(n, c, h * w)).view(n, 1, h, w)


def _add_per_image_(per_prompt: torch.Tensor, per_image: torch.Tensor, image_index: torch.Tensor) -> None:
    """per_prompt[k] += per_image[image_index[k]], one broadcast add per run of equal indices."""
    images, counts = torch.unique_consecutive(image_index, return_counts=True)
    start = 0
    for image, count in zip(images.tolist(), counts.tolist()):
        per_prompt[start : start + count] += per_image[image]
        start += count
