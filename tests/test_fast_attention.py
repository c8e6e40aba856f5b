"""FusedAttention (SDPA + decomposed rel-pos bias) computes what SAM's Attention computes."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention, Block

from hqsam.hqsam_core import build_hqsam
from hqsam.hqsam_core.build import _decoder, _prompt_encoder
from hqsam.hqsam_core.fast_attention import FusedAttention, attention_kind, rel_pos_attention, set_attention
from hqsam.hqsam_core.hqsam import HQSam

TOLERANCE = 1e-4


def _randomize_rel_pos_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """SAM zero-initialises the rel-pos tables; give them weight so the bias is really tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "rel_pos" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return module


def small_vit_hqsam(seed: int = 0, *, embed_dim: int = 64, heads: int = 2) -> HQSam:
    """An HQ-SAM whose ViT encoder is vit_b-shaped (1024 input, 16 px patches, 14 px windows,
    rel-pos) but narrow and 3 blocks deep, block 1 global: cheap on CPU, same code paths."""
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        img_size=1024,
        patch_size=16,
        embed_dim=embed_dim,
        depth=3,
        num_heads=heads,
        mlp_ratio=4,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=14,
        global_attn_indexes=(1,),
    )
    model = HQSam(
        encoder,
        _prompt_encoder(),
        _decoder(embed_dim),
        variant="vit_small_test",
        early_layer="blocks.1",
        early_to_nchw=lambda feature: feature.permute(0, 3, 1, 2),
    )
    return _randomize_rel_pos_(model, seed).eval()


def _attention(dim: int, heads: int, size: tuple[int, int], seed: int) -> Attention:
    torch.manual_seed(seed)
    return _randomize_rel_pos_(Attention(dim, heads, qkv_bias=True, use_rel_pos=True, input_size=size), seed)


@pytest.mark.parametrize(
    ("dim", "heads", "size", "batch", "max_bias_bytes"),
    [
        (96, 3, (14, 14), 6, None),  # windowed: a batch of 14x14 windows
        (64, 4, (9, 13), 2, 1),  # non-square grid, forced one-row query chunks
        (64, 2, (64, 64), 1, 16 * 2**20),  # global at SAM's 64x64 grid, chunks of 8 rows
        (64, 2, (64, 64), 1, None),  # global, whole bias in one go
    ],
)
def test_fused_attention_equals_sam_attention(dim, heads, size, batch, max_bias_bytes) -> None:
    official = _attention(dim, heads, size, seed=dim + size[0])
    fused = _attention(dim, heads, size, seed=dim + size[0])
    assert set_attention(fused, "sdpa", max_bias_bytes=max_bias_bytes) == 1
    assert type(fused) is FusedAttention
    x = torch.randn(batch, *size, dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = official(x), fused(x)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("size", [(14, 14), (9, 13)])
def test_bias_rows_padded_for_kernel_alignment(size) -> None:
    """The CUDA layout (bias rows padded to 16 elements, a strided mask view), checked on CPU."""
    attn = _attention(64, 2, size, seed=7)
    x = torch.randn(3, *size, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = attn(x)
        b, h, w, _ = x.shape
        q, k, v = attn.qkv(x).reshape(b, h * w, 3, 2, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = rel_pos_attention(q, k, v, attn.rel_pos_h, attn.rel_pos_w, size, attn.scale, mask_align=16)
        actual = attn.proj(out.reshape(b, h, w, -1))
    assert (actual - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(("window", "grid"), [(14, 20), (14, 14), (0, 16)])  # 20 pads to 28
def test_fused_attention_through_sam_blocks_with_window_padding(window: int, grid: int) -> None:
    torch.manual_seed(window + grid)
    block = Block(64, 2, use_rel_pos=True, window_size=window, input_size=(grid, grid))
    block = _randomize_rel_pos_(block, seed=grid).eval()
    x = torch.randn(2, grid, grid, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = block(x)
        set_attention(block, "sdpa")
        actual = block(x)
    assert (actual - expected).abs().max().item() <= TOLERANCE


def test_whole_encoder_and_early_feature_match_with_the_same_state_dict() -> None:
    """A vit_b-shaped encoder (1024 input, windows padded 64 -> 70, one global block)."""
    model = small_vit_hqsam(seed=3)
    keys = list(model.state_dict())
    images = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.image_features(images)
        assert set_attention(model, "sdpa") == 3 and attention_kind(model) == "sdpa"
        assert list(model.state_dict()) == keys
        actual = model.image_features(images)
        set_attention(model, "sam")
        assert attention_kind(model) == "sam"
        again = model.image_features(images)
    for e, a, g in zip(expected, actual, again):
        assert (a - e).abs().max().item() <= TOLERANCE
        assert torch.equal(g, e)  # switching back restores the official computation exactly


def test_build_option_keeps_checkpoint_keys() -> None:
    with torch.device("meta"):
        sam = build_hqsam("vit_b")
        fused = build_hqsam("vit_b", attention="sdpa")
    assert attention_kind(sam) == "sam" and attention_kind(fused) == "sdpa"
    assert sum(type(m) is FusedAttention for m in fused.modules()) == 12
    assert list(sam.state_dict()) == list(fused.state_dict())
    assert attention_kind(build_hqsam("vit_tiny", attention="sdpa")) is None  # TinyViT: untouched
    with pytest.raises(ValueError, match="attention"):
        build_hqsam("vit_tiny", attention="flash")


SHAPES = [(12, 768, (64, 64), 2), (16, 1280, (14, 14), 50)]  # heads, dim, tokens, batch


@pytest.mark.parametrize(("heads", "dim", "size", "batch"), SHAPES)
def test_fused_attention_fp32_and_bf16_on_cpu(heads, dim, size, batch) -> None:
    """vit_b global and vit_h windowed shapes, as on the GPU (one image of the global one)."""
    _fused_agrees_fp32_and_bf16(heads, dim, size, 1 if size == (64, 64) else batch, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize(("heads", "dim", "size", "batch"), SHAPES)
def test_fused_attention_on_cuda_fp32_and_bf16(heads, dim, size, batch) -> None:
    """The same on the GPU, where the global bias is chunked, so peak memory stays far below the
    full (B, heads, 4096, 4096) bias."""
    peak = _fused_agrees_fp32_and_bf16(heads, dim, size, batch, "cuda")
    n = size[0] * size[1]
    if n == 4096:
        assert peak < batch * heads * n * n * 4 / 2  # the full fp32 bias would be 1.5 GiB


def _fused_agrees_fp32_and_bf16(heads: int, dim: int, size: tuple[int, int], batch: int, device: str) -> int:
    """fp32 within TOLERANCE of SAM's attention, bf16 autocast within 5% of its largest output;
    the fused call's peak memory in bytes on CUDA (0 elsewhere)."""
    official = _attention(dim, heads, size, seed=5).to(device)
    fused = _attention(dim, heads, size, seed=5).to(device)
    set_attention(fused, "sdpa")
    x = torch.randn(batch, *size, dim, device=device, generator=torch.Generator(device).manual_seed(5))
    cuda = device == "cuda"
    with torch.no_grad():
        expected = official(x)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        actual = fused(x)
        peak = torch.cuda.max_memory_allocated() - base if cuda else 0
        assert (actual - expected).abs().max().item() <= TOLERANCE
        with torch.autocast(device, dtype=torch.bfloat16):
            low = fused(x)
    assert low.dtype == torch.bfloat16  # autocast took
    scale = expected.abs().max().item()
    assert (low.float() - expected).abs().max().item() <= 0.05 * scale
    return peak
