"""TinyViT image encoder used by MobileSAM and Light HQ-SAM (``vit_tiny``).

Attribute names mirror the official implementation so that its checkpoints load with
``strict=True``. Inference only: no drop path, dropout or gradient checkpointing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyViT", "early_feature_to_nchw", "EARLY_FEATURE_LAYER", "EARLY_FEATURE_SIZE"]

# Index in ``TinyViT.layers`` whose output (tokens) is the HQ-SAM early feature.
EARLY_FEATURE_LAYER = 1
# Spatial side of the early feature and of the final embedding for a 1024 input.
EARLY_FEATURE_SIZE = 64


class ConvBN(nn.Sequential):
    """Bias-free conv followed by BatchNorm (keys ``c.*`` and ``bn.*``).

    In eval mode without gradients the BatchNorm is folded into the conv (one op instead of two; the
    encoder runs ~6% faster on CPU), from weights cached until any of them changes.
    """

    def __init__(
        self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.add_module(
            "c",
            nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        )
        self.add_module("bn", nn.BatchNorm2d(out_chans))
        self._folded: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.bn(self.c(x))  # (a compiler folds it itself)
        weight, bias = self._folded_weights()
        conv = self.c
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def _folded_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.bn
        sources = (self.c.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        # load_state_dict bumps _version; .to() and .half() make new storage
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in sources)
        if self._folded is None or self._folded[0] != key:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            weight = self.c.weight * scale[:, None, None, None]
            self._folded = (key, weight, bn.bias - bn.running_mean * scale)
        return self._folded[1], self._folded[2]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of an NCHW tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    """Two stride-2 conv+BN layers: (B, 3, H, W) -> (B, C, H/4, W/4)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2, 3, 2),
            nn.GELU(),
            ConvBN(embed_dim // 2, embed_dim, 3, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block (1x1 expand, 3x3 depthwise, 1x1 project) on NCHW maps."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, dim)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        return self.act3(y + x)


class PatchMerging(nn.Module):
    """Downsample between stages; accepts NCHW maps or (B, H*W, C) tokens, returns tokens."""

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.act = nn.GELU()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Pre-norm two-layer MLP."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


def _relative_offset_index(window: int) -> torch.Tensor:
    """(N, N) index of |dy| * window + |dx| for every pair of positions in a square window.

    This equals the official numbering, which assigns ids to offsets in order of first
    appearance when scanning pairs from position (0, 0).
    """
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return dy * window + dx


class Attention(nn.Module):
    """Pre-norm multi-head self-attention over one window with a learned relative-offset bias.

    The bias is gathered from ``attention_biases`` on every call. The official module instead
    caches it when ``eval()`` is called, and its builder calls ``eval()`` before loading the
    checkpoint, so the official model as built runs with all-zero biases.
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", _relative_offset_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x))
        # The checkpoint packs q, k, v per head (head-major), not as three dim-sized blocks.
        q, k, v = qkv.view(b, n, self.num_heads, 3 * self.head_dim).permute(0, 2, 1, 3).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise local conv, then MLP; operates on (B, H*W, C) tokens."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        ws = self.window_size
        b, n, c = x.shape
        if h == ws and w == ws:
            return self.attn(x)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        # Padded zero tokens are attended to as keys (no mask), matching the official model.
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        return x[:, :h, :w].reshape(b, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, n, c = x.shape
        x = x + self._windowed_attention(x)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w))
        x = x.view(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks on NCHW maps, then patch merging to tokens."""

    def __init__(
        self, dim: int, resolution: tuple[int, int], depth: int, out_dim: int, expand_ratio: float
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(resolution, dim, out_dim, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class TransformerStage(nn.Module):
    """Stages 1-3: TinyViT blocks on tokens, optionally followed by patch merging."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        out_dim: int | None,
        merge_stride: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, resolution, num_heads, window_size, mlp_ratio, local_conv_size)
            for _ in range(depth)
        )
        self.downsample = (
            PatchMerging(resolution, dim, out_dim, merge_stride) if out_dim is not None else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class TinyViT(nn.Module):
    """TinyViT-5M backbone with SAM neck; defaults are the Light HQ-SAM / MobileSAM config.

    ``forward`` maps (B, 3, 1024, 1024) normalised images to (B, 256, 64, 64) embeddings.
    The classifier ``norm_head``/``head`` are unused but kept so checkpoints load strictly.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])

        # Resolutions halve after stages 0 and 1 only: the last merging keeps stride 1 so
        # the embedding stays at img_size / 16 like SAM's ViT encoders.
        res = img_size // 4
        num_stages = len(depths)
        self.layers = nn.ModuleList()
        self.layers.append(
            ConvStage(embed_dims[0], (res, res), depths[0], embed_dims[1], mbconv_expand_ratio)
        )
        res //= 2
        for i in range(1, num_stages):
            last = i == num_stages - 1
            stride = 1 if i == num_stages - 2 else 2
            self.layers.append(
                TransformerStage(
                    embed_dims[i],
                    (res, res),
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    local_conv_size,
                    out_dim=None if last else embed_dims[i + 1],
                    merge_stride=stride,
                )
            )
            if not last:
                res //= stride
        self.embed_size = res

        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, img_size, img_size) -> (B, out_chans, img_size/16, img_size/16)."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.embed_size, self.embed_size, c).permute(0, 3, 1, 2)
        return self.neck(x)

    @staticmethod
    def early_feature_to_nchw(tokens: torch.Tensor) -> torch.Tensor:
        """See :func:`early_feature_to_nchw`."""
        return early_feature_to_nchw(tokens)


def early_feature_to_nchw(tokens: torch.Tensor) -> torch.Tensor:
    """Turn the (B, 4096, 160) output of ``TinyViT.layers[1]`` into a (B, 160, 64, 64) map.

    Same layout as the official encoder's ``interm_embeddings[0]`` (B, 64, 64, 160) after the
    HQ decoder's ``permute(0, 3, 1, 2)``.
    """
    b = tokens.shape[0]
    return tokens.view(b, EARLY_FEATURE_SIZE, EARLY_FEATURE_SIZE, -1).permute(0, 3, 1, 2)
