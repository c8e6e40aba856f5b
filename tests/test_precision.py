"""BoxRefiner options of the fast path: precision, fixed-size prompt chunks, compile, the CUDA host side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hqsam.hqsam_core import BoxRefiner, build_hqsam
from hqsam.hqsam_core.fast_attention import attention_kind
from hqsam.hqsam_core.refiner import packbits
from hqsam.hqsam_core.testing.random_weights import randomize_
from tests.conftest import SHARED_FIXTURES
from tests.test_fast_attention import small_vit_hqsam

cuda = pytest.mark.cuda


def _images_and_boxes(seed: int = 0):
    rng = np.random.default_rng(seed)
    images = [
        np.kron(rng.integers(0, 256, (38, 50, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))[:300],
        np.kron(rng.integers(0, 256, (60, 40, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8)),
    ]
    boxes = [
        np.array([[20, 30, 300, 250], [150.5, 10.2, 390.7, 290.1], [0, 0, 400, 300]], np.float32),
        np.array([[30, 40, 300, 400], [-20, 100, 280, 460]], np.float32),
    ]
    return images, boxes


def _mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def test_cpu_defaults_are_the_official_path() -> None:
    model = small_vit_hqsam()
    refiner = BoxRefiner(model)
    assert (refiner.precision, refiner.attention, refiner.compile, refiner.pad_prompts) == (
        "fp32",
        None,
        None,
        False,
    )
    assert attention_kind(model) == "sam"
    assert BoxRefiner(model, attention="sdpa").attention == "sdpa" and attention_kind(model) == "sdpa"
    BoxRefiner(model, attention="sam")
    assert attention_kind(model) == "sam"
    for bad in ({"precision": "int8"}, {"attention": "flash"}, {"compile": "encoder"}):
        with pytest.raises(ValueError):
            BoxRefiner(model, **bad)


def test_padded_prompt_chunks_equal_unpadded() -> None:
    """Chunks padded to max_prompts (what compile=True uses) give exactly the unpadded results."""
    refiner = BoxRefiner(small_vit_hqsam(seed=2), max_prompts=4)
    images, boxes = _images_and_boxes()
    features = refiner.encode(images)
    flat, index = np.concatenate(boxes), np.array([0, 0, 0, 1, 1])  # chunks of 4 and 1 (padded to 4)
    plain = refiner.decode(features, flat, index, hq_token_only=True)
    refiner.pad_prompts = True
    padded = refiner.decode(features, flat, index, hq_token_only=True)
    for a, b in zip(plain, padded):
        assert a.masks.shape == b.masks.shape and len(b.scores) == len(a.scores)
        np.testing.assert_allclose(b.logits, a.logits, rtol=0, atol=1e-5)
        np.testing.assert_allclose(b.scores, a.scores, rtol=0, atol=1e-6)
        assert (a.masks != b.masks).mean() <= 1e-5


@pytest.mark.slow
def test_bf16_on_cpu_runs_and_agrees_with_fp32(capsys) -> None:
    model = randomize_(small_vit_hqsam(seed=4), seed=4)
    images, boxes = _images_and_boxes(seed=1)
    full = BoxRefiner(model).refine(images, boxes)
    low_refiner = BoxRefiner(model, precision="bf16", attention="sdpa")
    assert low_refiner.encode(images[:1]).hq_features.dtype == torch.bfloat16  # autocast is on
    low = low_refiner.refine(images, boxes)
    ious = []
    for a, b in zip(full, low):
        assert b.masks.dtype == bool and b.masks.shape == a.masks.shape
        assert b.logits.dtype == np.float32 and b.scores.dtype == np.float32
        assert a.masks.any() and (~a.masks).any(), "degenerate masks would prove little"
        ious.extend(_mask_ious(a.masks, b.masks))
    with capsys.disabled():
        print(
            f"\nbf16 vs fp32 on CPU (random weights): mean mask IoU {np.mean(ious):.4f}, worst {min(ious):.4f}"
        )
    assert np.mean(ious) >= 0.9


def _model_size_images_and_boxes():
    """Two textured images whose longer side is the model's 1024 already: no path resizes them."""
    rng = np.random.default_rng(7)
    images = [
        np.kron(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8)),
        np.kron(rng.integers(0, 256, (64, 36, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8)),
    ]
    boxes = [
        np.array([[20, 30, 600, 500], [300.5, 10.2, 1000.7, 760.1], [0, 0, 1024, 768]], np.float32),
        np.array([[30, 40, 500, 900], [-20, 100, 560, 1100]], np.float32),
    ]
    return images, boxes


def test_device_host_path_on_cpu_equals_the_cpu_path_bit_for_bit() -> None:
    """The host side CUDA runs (upload, resize and normalise on the device, upsampling, threshold and
    bit-packing there), run on CPU tensors: where nothing needs resizing, masks, logits and scores
    equal the CPU path's exactly (fp32)."""
    model = small_vit_hqsam(seed=3)
    images, boxes = _model_size_images_and_boxes()
    official = BoxRefiner(model, "cpu")
    device_side = BoxRefiner(model, "cpu", on_device=True)
    assert not official.on_device and device_side.on_device
    expected, actual = official.refine(images, boxes), device_side.refine(images, boxes)
    for a, b in zip(expected, actual):
        assert a.masks.any() and (~a.masks).any(), "degenerate masks would prove little"
        np.testing.assert_array_equal(b.packed_masks, a.packed_masks)
        np.testing.assert_array_equal(b.logits, a.logits)
        np.testing.assert_array_equal(b.scores, a.scores)


def test_packbits_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    for shape in [(3, 5, 7), (2, 8, 8), (1, 1, 1), (0, 4, 4)]:
        masks = rng.random(shape) > 0.5
        packed = packbits(torch.from_numpy(masks)).numpy()
        assert np.array_equal(packed, np.packbits(masks.reshape(shape[0], shape[1] * shape[2]), axis=1))
        back = np.unpackbits(packed, axis=1, count=shape[1] * shape[2]).view(bool).reshape(shape)
        assert np.array_equal(back, masks)


@pytest.mark.slow
def test_compiled_vit_tiny_decoder_equals_eager_on_cpu(tmp_path, monkeypatch) -> None:
    """torch.compile (inductor, C++ on a CPU) of vit_tiny's decoder: ~50 s of compiling on 2 cores
    with an empty cache."""
    # build_hqsam's random weights: seeded construction too, so the two models are the same
    _compiled_equals_eager(lambda: build_hqsam("vit_tiny", "random"), "cpu", "decoder", tmp_path, monkeypatch)


@cuda
@pytest.mark.parametrize("target", ["decoder", "all"])
def test_compiled_model_equals_eager_on_cuda(target, tmp_path, monkeypatch) -> None:
    _compiled_equals_eager(lambda: small_vit_hqsam(seed=5), "cuda", target, tmp_path, monkeypatch)


def _compiled_equals_eager(model, device: str, target: str, tmp_path, monkeypatch) -> None:
    """The compiled `model()` refines as the eager one, twice (the second call reuses the graphs)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    images, boxes = _images_and_boxes()
    eager = BoxRefiner(model(), device, precision="fp32", max_prompts=4)
    expected = eager.refine(images, boxes)
    compiled = BoxRefiner(model(), device, precision="fp32", max_prompts=4, compile=target)
    assert compiled.pad_prompts and compiled.compile == target
    for _ in range(2):  # the second call reuses the compiled graphs (fixed prompt count)
        results = compiled.refine(images, boxes)
    for a, b in zip(expected, results):
        np.testing.assert_allclose(b.logits, a.logits, rtol=0, atol=1e-3)
        assert (a.masks != b.masks).mean() <= 1e-3


# ------------------------------------------------------------------------------ CUDA only


def _fixture_images_and_boxes():
    from hqsam.hqsam_core.images import decode_image

    folder = SHARED_FIXTURES / "hqsam-demo"
    if not folder.exists():
        pytest.skip(f"shared fixture {folder} is absent")
    prompts = {
        "example1.png": [[306, 132, 925, 893]],
        "example6.png": [[181, 196, 757, 495]],
        "example7.png": [[45, 260, 515, 470], [310, 228, 424, 296]],
        "example8.png": [[0, 0, 1280, 720]],
    }
    images = [decode_image((folder / name).read_bytes()) for name in prompts]
    return images, [np.array(b, np.float32) for b in prompts.values()]


def _vit_b_model():
    """vit_b with the official weights when they are in the checkpoint cache, else random weights."""
    from hqsam.hqsam_core.zoo import cache_dir, zoo_entry

    path = cache_dir() / zoo_entry("sam_hq_vit_b").filename
    if path.exists():
        return build_hqsam("vit_b", str(path)), True
    return randomize_(build_hqsam("vit_b"), seed=4), False


@cuda
def test_bf16_agrees_with_fp32_on_cuda(capsys) -> None:
    """The issue-7 target: mean mask IoU >= 0.99 of bf16 against fp32 (with the official weights;
    random weights only get the looser 0.97, their masks being noisier)."""
    model, official = _vit_b_model()
    images, boxes = _fixture_images_and_boxes()
    full = BoxRefiner(model, "cuda", precision="fp32").refine(images, boxes)
    for precision in ("bf16", "fp16"):
        low = BoxRefiner(model, "cuda", precision=precision).refine(images, boxes)
        ious = np.concatenate([_mask_ious(a.masks, b.masks) for a, b in zip(full, low)])
        with capsys.disabled():
            print(f"\n{precision} vs fp32 on CUDA (official weights: {official}): mean IoU {ious.mean():.4f}")
        assert ious.mean() >= (0.99 if official else 0.97)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_device_host_path_agrees_with_the_official_path(device) -> None:
    """Resize on the device (antialiased bilinear, not PIL), upsampling there and bit-packed masks
    (CUDA's default; on CPU tensors where no GPU is): close to the official CPU path, not
    bit-identical, since the resize differs."""
    model = randomize_(build_hqsam("vit_tiny"), seed=4)
    images, boxes = _fixture_images_and_boxes()
    cpu = BoxRefiner(model, "cpu").refine(images, boxes)
    refiner = BoxRefiner(model, device, precision="fp32", attention="sam", on_device=True)
    gpu = refiner.refine(images, boxes)
    for a, b in zip(cpu, gpu):
        assert b.masks.dtype == bool and b.masks.shape == a.masks.shape
        assert _mask_ious(a.masks, b.masks).mean() >= 0.98
        assert (a.masks != b.masks).mean() <= 0.01
        assert np.abs(a.scores - b.scores).max() <= 0.02
