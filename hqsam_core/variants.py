"""The model variants, and the facts about each that more than one module needs.

Importable without torch: the CLI reads them before loading any model.
"""

from __future__ import annotations

from typing import Literal, get_args

VariantName = Literal["vit_b", "vit_l", "vit_h", "vit_tiny"]
VARIANTS: tuple[str, ...] = get_args(VariantName)

# Host memory a refine actor needs (weights, activations); asking for it also keeps Ray from
# fusing the IO and decode stages into the refine actor. Measured on CPU with the default
# --batch-size 4 and freed memory retained, as our CPU actors run: 4 images of 1024x768 with 16
# boxes each peaked at 3.1 GiB RSS for vit_tiny (Ray Data saw 2.2 GiB USS on examples/shapes) and
# 4.5 GiB for vit_b; about 25% on top, as Ray advises. vit_l and vit_h add their larger weights
# (1.2 and 2.5 GB against vit_b's 0.4) and wider encoder activations.
REFINE_ACTOR_MEMORY_GIB: dict[str, int] = {"vit_tiny": 4, "vit_b": 6, "vit_l": 8, "vit_h": 11}


def default_checkpoint(variant: str) -> str:
    """The zoo name of the official HQ-SAM weights of `variant`: the default checkpoint."""
    return f"sam_hq_{variant}"
