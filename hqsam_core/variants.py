"""The model variants, and the facts about each that more than one module needs.

Importable without torch: the CLI reads them before loading any model.
"""

from __future__ import annotations

from typing import Literal, get_args

VariantName = Literal["vit_b", "vit_l", "vit_h", "vit_tiny"]
VARIANTS: tuple[str, ...] = get_args(VariantName)

# Host memory a refine actor needs (weights, activations); asking for it also keeps Ray from
# fusing the IO and decode stages into the refine actor.
REFINE_ACTOR_MEMORY_GIB: dict[str, int] = {"vit_tiny": 2, "vit_b": 3, "vit_l": 5, "vit_h": 8}


def default_checkpoint(variant: str) -> str:
    """The zoo name of the official HQ-SAM weights of `variant`: the default checkpoint."""
    return f"sam_hq_{variant}"
