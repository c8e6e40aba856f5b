"""HQ-SAM core: the model, checkpoints, batched box refinement and mask maths (no Ray here)."""

from hqsam_core.build import MODEL_REGISTRY, VARIANTS, build_hqsam
from hqsam_core.checkpoint import CheckpointError, read_state_dict, save_hq_head, save_model
from hqsam_core.hqsam import HQSam
from hqsam_core.refiner import BoxRefiner, EncodedImages, Refinement

__all__ = [
    "MODEL_REGISTRY",
    "VARIANTS",
    "BoxRefiner",
    "CheckpointError",
    "EncodedImages",
    "HQSam",
    "Refinement",
    "build_hqsam",
    "read_state_dict",
    "save_hq_head",
    "save_model",
]
