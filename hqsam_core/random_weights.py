"""Random weights: `build_hqsam(variant, "random")` for a dry run without the official checkpoints,
and seeded random models for tests and benchmarks. Masks of random weights are meaningless."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported on use: the CLI checks sources without loading it
    import torch

RANDOM_WEIGHTS = "random"  # the checkpoint source that asks for random weights
# One fixed seed: every actor on every node builds the same weights, so a dry run's masks do not
# depend on which actor refined an image.
RANDOM_WEIGHTS_SEED = 0


def is_random_weights(source: str | None) -> bool:
    """Whether a checkpoint source asks for random weights."""
    return source == RANDOM_WEIGHTS


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic random weights (default-init scale plus noise), so nothing passes on default init."""
    import torch

    with torch.random.fork_rng(devices=[]), torch.no_grad():  # CPU only: never initialises CUDA
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        generator = torch.Generator().manual_seed(seed)
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator) * 0.02
            if name.endswith("running_var"):
                tensor.copy_(1.0 + noise.abs())
            else:
                tensor.add_(noise)
    return model
