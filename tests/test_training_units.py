"""The official training recipe's pieces: jitter, prompts, loss, freezing and the training forward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hqsam.hqsam_core import build_hqsam
from hqsam.hqsam_core.checkpoint import is_hq_key
from hqsam.hqsam_core.testing.random_weights import randomize_
from hqsam.hqsam_core.training import (
    HQTrainingModule,
    Prompt,
    freeze_sam_,
    hq_logits,
    large_scale_jitter,
    point_sampled_loss,
    preprocess_batch,
    sample_points,
    sample_prompt,
)

# ---------------------------------------------------------------------------------------------------
# large_scale_jitter


def _rect_sample(height: int = 300, width: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A dark image with a bright rectangle at rows [100, 150), columns [40, 80), and its mask."""
    image = np.full((height, width, 3), 10, dtype=np.uint8)
    image[100:150, 40:80] = 250
    mask = np.zeros((height, width), dtype=bool)
    mask[100:150, 40:80] = True
    return image, mask


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


@pytest.mark.parametrize("flip", [False, True])
def test_jitter_scales_pads_and_keeps_alignment(flip):
    image, mask = _rect_sample()
    out_image, out_mask = large_scale_jitter(
        image, mask, np.random.default_rng(0), scale_range=(0.5, 0.5), flip_p=1.0 if flip else 0.0
    )
    assert out_image.shape == (1024, 1024, 3) and out_image.dtype == np.uint8
    assert out_mask.shape == (1024, 1024) and out_mask.dtype == bool
    # longest side 300 -> round(0.5 * 1024) = 512: scale 512/300, content 512 x 341, rest padding
    scale = 512 / 300
    assert (out_image[512:] == 128).all() and (out_image[:, 341:] == 128).all()
    assert not out_mask[512:].any() and not out_mask[:, 341:].any()
    assert (out_image[:512, :341] != 128).all()
    cols = (200 - 80, 200 - 40) if flip else (40, 80)
    top, bottom, left, right = _box(out_mask)
    for got, want in zip(
        (top, bottom, left, right), (100 * scale, 150 * scale, cols[0] * scale, cols[1] * scale)
    ):
        assert abs(got - want) <= 1
    bright = out_image[..., 0] > 130
    assert (bright == out_mask).mean() > 0.999  # image and mask stay aligned (differ at most on edges)


def test_jitter_crop_follows_the_documented_draws():
    image, mask = _rect_sample()
    out_image, out_mask = large_scale_jitter(image, mask, np.random.default_rng(7), scale_range=(2.0, 2.0))
    replay = np.random.default_rng(7)
    flipped = replay.random() < 0.5
    replay.uniform(2.0, 2.0)
    # longest side 300 -> 2048: content 2048 x 1365, cropped to 1024 x 1024
    top = int(replay.integers(0, 2048 - 1024 + 1))
    left = int(replay.integers(0, 1365 - 1024 + 1))
    scale = 2048 / 300
    cols = (200 - 80, 200 - 40) if flipped else (40, 80)
    expected = np.zeros((2048, 1365), dtype=bool)
    expected[round(100 * scale) : round(150 * scale), round(cols[0] * scale) : round(cols[1] * scale)] = True
    expected = expected[top : top + 1024, left : left + 1024]
    assert (out_image != 128).any(axis=2).all()  # the crop fills the whole canvas
    assert (out_mask != expected).sum() <= 4 * 1024  # at most a one-pixel band along the edges
    assert out_mask.any() == expected.any()
    again = large_scale_jitter(image, mask, np.random.default_rng(7), scale_range=(2.0, 2.0))
    assert np.array_equal(again[0], out_image) and np.array_equal(again[1], out_mask)


def test_jitter_rejects_mismatched_inputs():
    image, mask = _rect_sample()
    with pytest.raises(ValueError):
        large_scale_jitter(image, mask[:-1], np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------
# sample_prompt


def _object_mask() -> np.ndarray:
    yy, xx = np.mgrid[0:1024, 0:1024]
    mask = (yy - 400) ** 2 + (xx - 500) ** 2 < 150**2
    mask[600:620, 200:900] = True  # a thin bar sticking out
    return mask


def test_sample_prompt_geometry_and_uniform_kinds():
    mask = _object_mask()
    rows, cols = np.nonzero(mask)
    rng = np.random.default_rng(3)
    counts = dict.fromkeys(("box", "points", "mask"), 0)
    small = torch.nn.functional.interpolate(
        torch.from_numpy(mask.astype(np.float32))[None, None], size=(256, 256), mode="bilinear"
    )[0, 0].numpy()
    for _ in range(300):
        prompt = sample_prompt(mask, rng)
        counts[prompt.kind] += 1
        if prompt.kind == "box":
            assert prompt.box.dtype == np.float32
            assert prompt.box.tolist() == [cols.min(), rows.min(), cols.max(), rows.max()]
        elif prompt.kind == "points":
            assert prompt.points.shape == (10, 2) and prompt.points.dtype == np.float32
            x, y = prompt.points[:, 0].astype(int), prompt.points[:, 1].astype(int)
            assert mask[y, x].all()
            assert len({(a, b) for a, b in zip(x, y)}) == 10
        else:
            assert prompt.mask.shape == (256, 256) and prompt.mask.dtype == np.float32
            assert set(np.unique(prompt.mask)) <= {0.0, 255.0}
            agree = (prompt.mask > 0) == (small > 0.5)
            assert agree.mean() > 0.97
    # uniform over three kinds: 300 draws, each count ~ Binomial(300, 1/3) (sd 8.2)
    assert all(70 <= count <= 130 for count in counts.values()), counts


def test_noisy_mask_noise_stays_on_the_boundary_band():
    mask = _object_mask()
    rng = np.random.default_rng(5)
    prompts = [p for p in (sample_prompt(mask, rng) for _ in range(30)) if p.kind == "mask"]
    assert prompts
    small = torch.nn.functional.interpolate(
        torch.from_numpy(mask.astype(np.float32))[None, None], size=(256, 256), mode="bilinear"
    )[0, 0].numpy()
    interior = np.zeros_like(small, dtype=bool)
    interior[8:-8, 8:-8] = True
    yy, xx = np.mgrid[0:256, 0:256]
    far_inside = ((yy - 100) ** 2 + (xx - 125) ** 2 < 25**2) & interior
    far_outside = ((yy - 100) ** 2 + (xx - 125) ** 2 > 50**2) & ~((yy > 135) & (yy < 170))
    for prompt in prompts:
        assert (prompt.mask[far_inside] == 255).all() and (prompt.mask[far_outside] == 0).all()
    assert any(((p.mask > 0) != (small > 0.5)).any() for p in prompts)  # the noise does change pixels


def test_sample_prompt_small_and_empty_masks():
    rng = np.random.default_rng(0)
    tiny = np.zeros((1024, 1024), dtype=bool)
    tiny[5, 5:10] = True  # 5 pixels: no 10 distinct points
    kinds = {sample_prompt(tiny, rng).kind for _ in range(60)}
    assert kinds == {"box", "mask"}
    empty = sample_prompt(np.zeros((1024, 1024), dtype=bool), rng)
    assert empty.kind == "mask" and not empty.mask.any()


# ---------------------------------------------------------------------------------------------------
# point_sampled_loss


def test_loss_closed_form_for_zero_logits():
    # sigmoid(0) = 1/2 everywhere, also where bilinear sampling meets the zero padding
    logits = torch.zeros(2, 1, 64, 64)
    targets = torch.zeros(2, 1, 256, 256)
    bce, dice = point_sampled_loss(logits, targets, generator=torch.Generator().manual_seed(0))
    points = 112 * 112
    assert bce.item() == pytest.approx(math.log(2), rel=1e-6)
    assert dice.item() == pytest.approx(1 - 1 / (points / 2 + 1), rel=1e-6)


def _bilinear(grid: np.ndarray, x: float, y: float) -> float:
    """grid_sample(align_corners=False, zeros padding) at normalized (x, y), written out by hand."""
    h, w = grid.shape
    u, v = x * w - 0.5, y * h - 0.5
    u0, v0 = math.floor(u), math.floor(v)
    total = 0.0
    for dv in (0, 1):
        for du in (0, 1):
            r, c = v0 + dv, u0 + du
            weight = (1 - abs(u - c)) * (1 - abs(v - r))
            if 0 <= r < h and 0 <= c < w:
                total += weight * grid[r, c]
    return total


def test_loss_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 8, 8, generator=gen) * 3
    logits[0, 0, 2:5, 2:5] = 0.05  # a clearly uncertain region
    targets = (torch.rand(2, 1, 16, 16, generator=gen) > 0.5).float()
    kwargs = {"num_points": 20, "oversample_ratio": 3.0, "importance_ratio": 0.75}

    coords = sample_points(logits, generator=torch.Generator().manual_seed(9), **kwargs).numpy()
    candidates = torch.rand(2, 60, 2, generator=torch.Generator().manual_seed(9)).numpy()
    bce_terms, dice_terms = [], []
    for b in range(2):
        # the first 15 points are the 15 most uncertain (smallest |logit|) of the 60 candidates
        uncertainty = [-abs(_bilinear(logits[b, 0].numpy(), x, y)) for x, y in candidates[b]]
        top = {tuple(candidates[b, i]) for i in np.argsort(uncertainty)[::-1][:15]}
        assert {tuple(c) for c in coords[b, :15]} == top
        z = np.array([_bilinear(logits[b, 0].numpy(), x, y) for x, y in coords[b]])
        t = np.array([_bilinear(targets[b, 0].numpy(), x, y) for x, y in coords[b]])
        bce_terms.append(np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))))
        p = 1 / (1 + np.exp(-z))
        dice_terms.append(1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))

    logits.requires_grad_(True)
    bce, dice = point_sampled_loss(logits, targets, generator=torch.Generator().manual_seed(9), **kwargs)
    assert bce.item() == pytest.approx(sum(bce_terms) / 2, rel=1e-5)
    assert dice.item() == pytest.approx(sum(dice_terms) / 2, rel=1e-5)
    (bce + dice).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# freeze_sam_, preprocess_batch, hq_logits


@pytest.fixture(scope="module")
def tiny_model():
    return randomize_(build_hqsam("vit_tiny"), seed=21)


def test_freeze_sam_leaves_only_the_hq_head_trainable(tiny_model):
    trainable = freeze_sam_(tiny_model)
    names = {name for name, param in tiny_model.named_parameters() if param.requires_grad}
    assert names == {name for name, _ in tiny_model.named_parameters() if is_hq_key(name)}
    assert {id(p) for p in trainable} == {id(p) for _, p in tiny_model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable) == 448_512  # REFERENCE section 1, vit_tiny


def test_preprocess_batch_matches_model_preprocess(tiny_model):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8) for _ in range(2)]
    batch = preprocess_batch(tiny_model, images)
    assert batch.shape == (2, 3, 1024, 1024) and batch.dtype == torch.float32
    single = tiny_model.preprocess(torch.from_numpy(images[1]).permute(2, 0, 1).float())
    assert torch.allclose(batch[1], single)


def _encode_each_image_once(model, monkeypatch) -> None:
    """Run the real encoder once per distinct image (the slow part on CPU), reusing it later."""
    real, cache = model.image_features, {}

    def image_features(images):
        outputs = []
        for image in images:
            key = image.cpu().numpy().tobytes()
            if key not in cache:
                cache[key] = real(image[None])
            outputs.append(cache[key])
        return tuple(torch.cat(parts) for parts in zip(*outputs))

    monkeypatch.setattr(model, "image_features", image_features)


def test_hq_logits_pairs_prompts_with_their_images_and_trains_only_the_head(tiny_model, monkeypatch):
    model = tiny_model
    _encode_each_image_once(model, monkeypatch)
    trainable = freeze_sam_(model)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8) for _ in range(2)]
    images[1][200:600, 300:700] = 255  # a different image with an object
    target = np.zeros((1024, 1024), dtype=bool)
    target[200:600, 300:700] = True
    box = Prompt("box", box=np.array([300, 200, 699, 599], dtype=np.float32))
    noisy = sample_prompt(target, np.random.default_rng(2))
    noisy = noisy if noisy.kind == "mask" else Prompt("mask", mask=target[::4, ::4].astype(np.float32) * 255)
    batch = preprocess_batch(model, images)

    model.train()  # the frozen encoder must still run in eval mode (TinyViT has BatchNorm)
    bn = next(m for m in model.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    running_mean = bn.running_mean.clone()
    mixed = HQTrainingModule(model)(batch, [noisy, box])  # kinds out of order: mask on 0, box on 1
    assert mixed.shape == (2, 1, 256, 256)
    assert torch.equal(bn.running_mean, running_mean) and model.image_encoder.training

    bce, dice = point_sampled_loss(mixed, torch.from_numpy(np.stack([target, target]))[:, None].float())
    (bce + dice).backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == is_hq_key(name), name
    assert all(p.grad.abs().sum() > 0 for p in trainable)
    model.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        swapped = hq_logits(model, batch.flip(0), [box, box])
    assert torch.allclose(swapped[0], mixed[1].detach(), atol=1e-4)  # image 1 with the box, either batch
    assert not torch.allclose(swapped[0], swapped[1], atol=1e-2)  # the image matters
