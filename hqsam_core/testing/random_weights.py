"""Random weights for tests and benchmarks, where no official checkpoint can be downloaded (the
function lives in hqsam_core.random_weights, where `build_hqsam(variant, "random")` uses it)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hqsam.hqsam_core.random_weights import randomize_

__all__ = ["calibrate_batchnorm_", "randomize_"]


def calibrate_batchnorm_(model: torch.nn.Module, images: Sequence[np.ndarray]) -> torch.nn.Module:
    """The model in eval mode, its encoder's BatchNorms holding the statistics of `images`: with
    random weights, the early ViT features then vary over an image instead of being near constant."""
    from hqsam.hqsam_core.training import preprocess_batch

    for module in model.image_encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    model.image_encoder.train()
    with torch.no_grad():
        model.image_encoder(preprocess_batch(model, images))
    return model.eval()
