"""The model variants, importable without torch (the CLI reads them before loading any model)."""

VARIANTS = ("vit_b", "vit_l", "vit_h", "vit_tiny")
