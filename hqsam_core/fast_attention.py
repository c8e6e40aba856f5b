"""SAM's ViT attention through `scaled_dot_product_attention`, with its decomposed rel-pos bias.

`FusedAttention` computes exactly what `segment_anything.modeling.image_encoder.Attention` computes
(softmax(q k^T * scale + rel_h + rel_w) v, then the output projection) with the same parameters and
state-dict keys, but hands the product to PyTorch's fused attention kernels instead of building the
attention matrix itself. The relative-position bias is decomposed (MViTv2): for a query at (y, x)
and a key at (y', x'), bias = rel_h[y, x, y'] + rel_w[y, x, x']. It goes to SDPA as `attn_mask`; for
the global blocks the full mask would be (B, heads, 4096, 4096) - 1.5 GiB per vit_h image in bf16 -
so queries are processed in row chunks whose mask stays under `max_bias_bytes`.

Swapping is in place (`set_attention`): each `Attention` module's class becomes `FusedAttention` and
back, so parameters, hooks and state-dict keys stay as they are.

Unlike segment-anything-fast's Triton kernel (right only with BLOCK_N == 64, see REFERENCE
section 5), nothing here depends on a kernel tile size: the mask is an ordinary tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

ATTENTION_KINDS: tuple[str, ...] = ("sam", "sdpa")
DEFAULT_MAX_BIAS_BYTES = 256 * 2**20


class FusedAttention(Attention):
    """Drop-in for SAM's `Attention` (same parameters), computed with `F.scaled_dot_product_attention`."""

    max_bias_bytes: int = DEFAULT_MAX_BIAS_BYTES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        # (3, B, heads, H*W, head_dim) views; SDPA takes the strided q, k, v as they are.
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_rel_pos:
            out = rel_pos_attention(
                q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale, self.max_bias_bytes
            )
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2)
        # out: (B, H*W, heads, head_dim), heads-major channels like SAM's permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(b, h, w, -1))


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
    scale: float,
    max_bias_bytes: int = DEFAULT_MAX_BIAS_BYTES,
    mask_align: int | None = None,
) -> torch.Tensor:
    """Attention of (B, heads, H*W, C) q, k, v over an HxW grid with the decomposed rel-pos bias.

    Returns (B, H*W, heads, C). Queries go in chunks of whole grid rows, each chunk's bias
    (B, heads, rows*W, H*W) at most `max_bias_bytes` (at least one row). The bias is written into
    a buffer whose rows are padded to a multiple of `mask_align` elements (default 16 on CUDA, where
    the memory-efficient kernel would otherwise pad a 196-wide window mask by a copy, else 1).
    """
    bsz, heads, n, dim = q.shape
    h, w = size
    r_q = q.reshape(bsz, heads, h, w, dim)
    # As SAM's add_decomposed_rel_pos: the unscaled q against the gathered rel-pos tables.
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, _rel_pos_table(h, rel_pos_h).to(q.dtype))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, _rel_pos_table(w, rel_pos_w).to(q.dtype))

    align = mask_align or (16 if q.is_cuda else 1)
    stride = -(-n // align) * align  # a bias row's length in its buffer
    row_bytes = bsz * heads * w * stride * q.element_size()
    rows = max(1, min(h, max_bias_bytes // max(row_bytes, 1)))

    padded = stride != n and not torch.compiler.is_compiling()  # inductor lays out buffers itself

    def rows_attention(start: int, stop: int) -> torch.Tensor:
        m = (stop - start) * w
        part_h = rel_h[:, :, start:stop].reshape(bsz, heads, m, h, 1)
        part_w = rel_w[:, :, start:stop].reshape(bsz, heads, m, 1, w)
        if padded:
            bias = q.new_empty(bsz, heads, m, stride)[..., :n]
            torch.add(part_h, part_w, out=bias.unflatten(-1, (h, w)))
        else:
            bias = (part_h + part_w).reshape(bsz, heads, m, n)
        q_rows = q[:, :, start * w : stop * w]
        return F.scaled_dot_product_attention(q_rows, k, v, attn_mask=bias, scale=scale).transpose(1, 2)

    if rows >= h:
        return rows_attention(0, h)
    out = q.new_empty(bsz, n, heads, dim)
    for start in range(0, h, rows):
        stop = min(h, start + rows)
        out[:, start * w : stop * w] = rows_attention(start, stop)
    return out


def _rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """(size, size, C): rel_pos[i - j + size - 1], as SAM's get_rel_pos for equal q and k sizes."""
    if rel_pos.shape[0] != 2 * size - 1:
        return get_rel_pos(size, size, rel_pos)  # interpolating case: SAM's own code
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + (size - 1)]


def set_attention(module: nn.Module, kind: str, *, max_bias_bytes: int | None = None) -> int:
    """Switch every SAM `Attention` inside `module` to `kind` ("sdpa" or "sam"), in place.

    Returns how many modules are of that kind afterwards (0 for encoders without SAM attention,
    such as vit_tiny's TinyViT). Parameters, buffers, hooks and state-dict keys are untouched.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {kind!r}")
    target = FusedAttention if kind == "sdpa" else Attention
    count = 0
    for child in module.modules():
        if type(child) in (Attention, FusedAttention):
            child.__class__ = target
            if max_bias_bytes is not None and kind == "sdpa":
                child.max_bias_bytes = int(max_bias_bytes)
            count += 1
    return count


def attention_kind(module: nn.Module) -> str | None:
    """ "sdpa" or "sam" when all SAM attention modules in `module` are of one kind; None if there are none."""
    kinds = {
        "sdpa" if type(m) is FusedAttention else "sam"
        for m in module.modules()
        if type(m) in (Attention, FusedAttention)
    }
    if len(kinds) > 1:
        raise ValueError("mixed attention kinds in one model")
    return kinds.pop() if kinds else None
