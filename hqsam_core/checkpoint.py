"""Reading, checking and writing official-format HQ-SAM state dicts."""

from __future__ import annotations

import os

import torch
from torch import nn

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError
from hqsam.hqsam_core.mask_decoder_hq import HQ_MODULES
from hqsam.hqsam_core.zoo import fetch_checkpoint, shown_source

HQ_KEY_PREFIXES = tuple(f"mask_decoder.{name}." for name in HQ_MODULES)
_ENCODER_WIDTH_TO_VARIANT = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}

StateDict = dict[str, torch.Tensor]


class CheckpointError(HqsamError, ValueError):
    """A checkpoint that cannot be used for the requested model; the message is one sentence."""


def is_hq_key(key: str) -> bool:
    return key.startswith(HQ_KEY_PREFIXES)


def hq_keys(model: nn.Module) -> set[str]:
    return {key for key in model.state_dict() if is_hq_key(key)}


def read_state_dict(source: str) -> StateDict:
    """Load a state dict from a path, fsspec URI or zoo name, pinned or not (tensors only:
    weights_only=True)."""
    path = fetch_checkpoint(source)
    source = shown_source(source)  # messages never show a URL's credentials or signature
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{source} is not a readable PyTorch checkpoint (the file is empty).")
    try:
        try:  # mmap reads tensors lazily: checking a multi-GB file costs little memory
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in torch's legacy (non-zip) format cannot be mapped
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(
            f"{source} is not a readable PyTorch checkpoint ({_load_failure(error)})."
        ) from None
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict) and len(loaded) <= 3:
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{source} does not hold a state dict of tensors.")
    return loaded


def _load_failure(error: Exception) -> str:
    text = " ".join(str(error).split())
    if "Weights only load failed" in text:
        # torch's own text leads with advice to retry with weights_only=False, i.e. to run the
        # file's code; keep only its diagnosis.
        detail = text.partition("WeightsUnpickler error:")[2].partition(" Check the documentation")[0]
        text = f"holds data other than tensors, or is no PyTorch file: {detail.strip() or 'unsupported'}"
    else:
        text = text.partition(". ")[0]
    return (f"{type(error).__name__}: {text}" if text else type(error).__name__)[:200]


def detect_variant(state: StateDict) -> str | None:
    """Which HQ-SAM variant a (possibly partial) state dict belongs to, when it can tell."""
    if any(key.startswith("image_encoder.layers.") for key in state):
        return "vit_tiny"
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is not None:
        return _ENCODER_WIDTH_TO_VARIANT.get(patch.shape[0])
    compress = state.get("mask_decoder.compress_vit_feat.0.weight")
    if compress is not None:
        return {160: "vit_tiny", **_ENCODER_WIDTH_TO_VARIANT}.get(compress.shape[0])
    return None


def merge_checkpoint(
    model: nn.Module,
    base: StateDict,
    head: StateDict | None,
    base_source: str,
    head_source: str | None,
    variant: str,
) -> tuple[StateDict, bool]:
    """Check `base` (SAM or HQ-SAM weights) and optional `head` (HQ keys) against `model`.

    Returns the merged state dict and whether the HQ head is still missing.
    """
    expected = {key: value.shape for key, value in model.state_dict().items()}
    hq = {key for key in expected if is_hq_key(key)}
    _check_part(base, {k: s for k, s in expected.items() if k not in hq}, base_source, variant, hq)
    base_hq = hq & base.keys()
    if base_hq and base_hq != hq:
        missing = sorted(hq - base_hq)
        raise CheckpointError(
            f"{base_source} has an incomplete HQ head ({len(missing)} keys missing, e.g. {missing[0]})."
        )
    if base_hq:  # the HQ keys were only tolerated above: check their shapes too
        _check_part({k: base[k] for k in hq}, {k: expected[k] for k in hq}, base_source, variant, set())
    state = dict(base)
    if head is not None:
        foreign = sorted(key for key in head if not is_hq_key(key))
        if foreign:
            raise CheckpointError(
                f"{head_source} is not an HQ-head file: it holds {len(foreign)} weights outside the HQ head "
                f"(e.g. {foreign[0]}); pass a full HQ-SAM file as --checkpoint instead."
            )
        _check_part(head, {k: expected[k] for k in hq}, head_source or "hq_head", variant, set())
        state.update(head)
    return state, not (hq <= state.keys())


def _check_part(
    state: StateDict, expected: dict[str, torch.Size], source: str, variant: str, tolerated: set[str]
) -> None:
    detected = detect_variant(state)
    if detected is not None and detected != variant:
        raise CheckpointError(
            f"{source} holds {detected} weights but the model is {variant}; pass --model {detected} "
            f"or a {variant} checkpoint."
        )
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise CheckpointError(
            f"{source} is not a {variant} checkpoint: {len(missing)} of {len(expected)} expected weights "
            f"are missing (e.g. {missing[0]})."
        )
    unknown = sorted(state.keys() - expected.keys() - tolerated)
    if unknown:
        raise CheckpointError(
            f"{source} has {len(unknown)} weights that {variant} lacks (e.g. {unknown[0]})."
        )
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(
                f"{source} does not fit {variant}: {key} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(shape)}."
            )


def save_model(model: nn.Module, uri: str) -> None:
    """Write the full official-format state dict (loads strictly into the official package)."""
    _save(model.state_dict(), uri)


def save_hq_head(model: nn.Module, uri: str) -> None:
    """Write only the HQ keys, under their official names."""
    _save({key: value for key, value in model.state_dict().items() if is_hq_key(key)}, uri)


def _save(state: StateDict, uri: str) -> None:
    """Write `state` so that `uri` holds the whole file or its previous content, never half of it."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    with storage.atomic_writer(uri) as handle:
        torch.save(tensors, handle)
