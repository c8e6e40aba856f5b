"""Random weights for tests and benchmarks, where no official checkpoint can be downloaded."""

from __future__ import annotations

import torch


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic random weights (default-init scale plus noise), so nothing passes on default init."""
    with torch.random.fork_rng(), torch.no_grad():
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
