"""Shared fixtures: paths to the shared real fixtures, random-weight models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"


def shared_fixture(name: str) -> Path:
    """Path of a fixture in ../shared/fixtures, skipping the test cleanly when absent."""
    path = SHARED_FIXTURES / name
    if not path.exists():
        pytest.skip(f"shared fixture {path} is absent")
    return path


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every weight a deterministic random value so that no test passes on default init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator) * 0.02
            if name.endswith("running_var"):
                tensor.copy_(1.0 + noise.abs())
            else:
                tensor.add_(noise)
    return model
