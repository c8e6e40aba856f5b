"""Our TinyViT must be a drop-in, numerically identical copy of the official vit_tiny encoder."""

import pytest
import torch
from torch import nn

from hqsam.hqsam_core.tiny_vit import EARLY_FEATURE_LAYER, ConvBN, TinyViT, early_feature_to_nchw

sam_hq = pytest.importorskip("segment_anything_hq")


def _randomise_(module: nn.Module, seed: int = 0) -> None:
    """Overwrite every persistent float tensor with small deterministic noise.

    Norm gains (1-D ``weight``) are centred on 1 and BatchNorm variances kept positive so that
    activations do not collapse to zero through the network.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # state_dict tensors share storage with the module, so copy_ writes through.
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen) * 0.02
            if name.endswith("running_var"):
                noise = noise.abs() + 0.5
            elif name.endswith("weight") and t.ndim == 1:
                noise = noise + 1.0
            elif name.endswith("attention_biases"):
                # O(1) like trained biases, so a wrong offset index would visibly change the output.
                noise = noise * 50
            t.copy_(noise)


@pytest.fixture(scope="module")
def official() -> nn.Module:
    torch.manual_seed(0)
    enc = sam_hq.sam_model_registry["vit_tiny"]().image_encoder
    _randomise_(enc)
    # The official Attention caches its bias in train(False); refresh it after changing weights.
    return enc.eval()


@pytest.fixture(scope="module")
def ours(official: nn.Module) -> TinyViT:
    model = TinyViT()
    model.load_state_dict(official.state_dict(), strict=True)
    return model.eval()


def test_state_dict_keys_and_shapes_match(official: nn.Module, ours: TinyViT) -> None:
    ref = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine.keys() == ref.keys()
    assert mine == ref
    assert ours.img_size == 1024


def test_load_ours_into_official_strict(ours: TinyViT) -> None:
    fresh = sam_hq.sam_model_registry["vit_tiny"]().image_encoder
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k


def test_forward_matches_official(official: nn.Module, ours: TinyViT) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 1024, 1024)
    captured: list[torch.Tensor] = []
    hook = ours.layers[EARLY_FEATURE_LAYER].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            ref_emb, ref_interm = official(x)
            emb = ours(x)
    finally:
        hook.remove()

    assert emb.shape == (2, 256, 64, 64)
    assert ref_interm[0].shape == (2, 64, 64, 160)
    assert len(captured) == 1 and captured[0].shape == (2, 4096, 160)
    early = early_feature_to_nchw(captured[0])
    assert early.shape == (2, 160, 64, 64)
    assert torch.equal(TinyViT.early_feature_to_nchw(captured[0]), early)

    # Guard against a trivially passing comparison (e.g. constant outputs).
    assert emb.std() > 0.1 and early.std() > 1e-3
    torch.testing.assert_close(emb, ref_emb, atol=1e-4, rtol=0)
    # Early features are small (std ~0.03) with these weights; compare in units of their std.
    ref_early = ref_interm[0].permute(0, 3, 1, 2)
    scale = ref_early.std()
    torch.testing.assert_close(early / scale, ref_early / scale, atol=1e-4, rtol=0)


def test_conv_bn_folds_in_inference_and_follows_new_weights() -> None:
    torch.manual_seed(0)
    layer = ConvBN(4, 6, kernel_size=3, groups=2)
    with torch.no_grad():
        for tensor in (layer.bn.weight, layer.bn.bias, layer.bn.running_mean):
            tensor.normal_()
        layer.bn.running_var.uniform_(0.5, 2.0)
    layer.eval()
    x = torch.randn(2, 4, 9, 7)
    with torch.no_grad():
        unfolded = layer.bn(layer.c(x))
        torch.testing.assert_close(layer(x), unfolded, rtol=1e-5, atol=1e-5)
        # a checkpoint loaded afterwards is used, not the weights folded before
        state = {
            k: v * 2 if v.is_floating_point() and "running_var" not in k else v
            for k, v in layer.state_dict().items()
        }
        layer.load_state_dict(state)
        torch.testing.assert_close(layer(x), layer.bn(layer.c(x)), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(layer(x), unfolded)
    layer.train()
    assert layer(x).requires_grad  # training: the plain conv + BatchNorm path, with gradients
