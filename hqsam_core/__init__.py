"""HQ-SAM core: the model, checkpoints, batched box refinement and mask maths (no Ray here).

Names are imported on first use, so `import hqsam.hqsam_core.variants` (e.g. for a CLI's --help)
does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MODEL_REGISTRY": "hqsam.hqsam_core.build",
    "build_hqsam": "hqsam.hqsam_core.build",
    "CheckpointError": "hqsam.hqsam_core.checkpoint",
    "read_state_dict": "hqsam.hqsam_core.checkpoint",
    "save_hq_head": "hqsam.hqsam_core.checkpoint",
    "save_model": "hqsam.hqsam_core.checkpoint",
    "HQSam": "hqsam.hqsam_core.hqsam",
    "BoxRefiner": "hqsam.hqsam_core.refiner",
    "EncodedImages": "hqsam.hqsam_core.refiner",
    "Refinement": "hqsam.hqsam_core.refiner",
    "VARIANTS": "hqsam.hqsam_core.variants",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    # dir() and tab completion list the public names too, without importing them
    return sorted({*globals(), *_EXPORTS})
