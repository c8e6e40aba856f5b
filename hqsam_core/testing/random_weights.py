"""Random weights for tests and benchmarks, where no official checkpoint can be downloaded (the
function lives in hqsam_core.random_weights, where `build_hqsam(variant, "random")` uses it)."""

from __future__ import annotations

from hqsam.hqsam_core.random_weights import randomize_

__all__ = ["randomize_"]
