"""One variant list: every per-variant table and choice agrees with hqsam_core.variants.VARIANTS."""

from __future__ import annotations

from hqsam.hqsam_core.variants import REFINE_ACTOR_MEMORY_GIB, VARIANTS, default_checkpoint


def test_every_variant_has_a_builder_and_a_refine_actor_size():
    from hqsam.hqsam_core.build import MODEL_REGISTRY

    assert VARIANTS == ("vit_b", "vit_l", "vit_h", "vit_tiny")
    assert tuple(MODEL_REGISTRY) == VARIANTS
    assert set(REFINE_ACTOR_MEMORY_GIB) == set(VARIANTS)
    assert all(gib > 0 for gib in REFINE_ACTOR_MEMORY_GIB.values())


def test_every_variant_defaults_to_its_official_hq_sam_zoo_entry():
    from hqsam.hqsam_core.zoo import ZOO

    for variant in VARIANTS:
        entry = ZOO[default_checkpoint(variant)]
        assert (entry.variant, entry.has_hq_head) == (variant, True)
    assert {entry.variant for entry in ZOO.values()} == set(VARIANTS)


def test_the_cli_offers_exactly_the_variants():
    from hqsam.jobs.options import Variant

    assert tuple(choice.value for choice in Variant) == VARIANTS
