"""Checkpoints: our state dicts are the official HQ-SAM ones, and bad files fail with one-line errors."""

from __future__ import annotations

import logging
import pickle
import random
import uuid
from pathlib import Path

import fsspec
import pytest
import segment_anything
import torch

from hqsam.hqsam_core import CheckpointError, build_hqsam, save_hq_head, save_model
from hqsam.hqsam_core.build import VARIANTS
from hqsam.hqsam_core.testing.random_weights import randomize_

segment_anything_hq = pytest.importorskip("segment_anything_hq")

HQ_PREFIXES = tuple(
    f"mask_decoder.{name}."
    for name in ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")
)
# Parameters HQ-SAM adds to SAM, as published with the reference implementation.
REFERENCE_HQ_PARAMS = {"vit_b": 1_071_104, "vit_l": 1_333_248, "vit_h": 1_595_392, "vit_tiny": 448_512}


def _official(variant: str) -> torch.nn.Module:
    return segment_anything_hq.sam_model_registry[variant]()


def _meta_pair(variant: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    # The official TinyViT calls .item() while building, which meta tensors cannot; it is small anyway.
    with torch.device("cpu" if variant == "vit_tiny" else "meta"):
        return build_hqsam(variant), _official(variant)


@pytest.fixture(scope="module")
def official_hq_keys() -> set[str]:
    """The official HQ-SAM keys that plain SAM lacks (the HQ head)."""
    with torch.device("meta"):
        hq = _official("vit_b").state_dict().keys()
        plain = segment_anything.sam_model_registry["vit_b"]().state_dict().keys()
    keys = set(hq) - set(plain)
    assert keys and all(key.startswith(HQ_PREFIXES) for key in keys)
    return keys


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return randomize_(build_hqsam("vit_tiny"), seed=11)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory, tiny: torch.nn.Module) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_model(tiny, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_head_file(tmp_path_factory: pytest.TempPathFactory, tiny: torch.nn.Module) -> Path:
    path = tmp_path_factory.mktemp("head") / "tiny_head.pth"
    save_hq_head(tiny, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_plain_file(
    tmp_path_factory: pytest.TempPathFactory, tiny: torch.nn.Module, official_hq_keys: set[str]
) -> Path:
    """A plain SAM-format vit_tiny checkpoint: the HQ keys removed."""
    path = tmp_path_factory.mktemp("plain") / "tiny_plain.pth"
    state = {k: v for k, v in tiny.state_dict().items() if k not in official_hq_keys}
    torch.save(state, path)
    return path


def _load(path: Path | str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def _without(state: dict[str, torch.Tensor], keys: set[str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k not in keys}


def _assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- interchange with the official package -------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_keys_and_shapes_equal_official(variant: str) -> None:
    ours, official = _meta_pair(variant)
    ours_state, official_state = ours.state_dict(), official.state_dict()
    assert ours_state.keys() == official_state.keys()
    assert {k: v.shape for k, v in ours_state.items()} == {k: v.shape for k, v in official_state.items()}
    official.load_state_dict(ours_state, strict=True, assign=True)
    ours.load_state_dict(official_state, strict=True, assign=True)


@pytest.mark.parametrize("variant", ["vit_tiny", "vit_b"])
def test_weights_load_strictly_both_ways(variant: str) -> None:
    ours = randomize_(build_hqsam(variant), seed=1)
    official = _official(variant)
    official.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_tensors(official.state_dict(), ours.state_dict())

    official = randomize_(_official(variant), seed=2)
    ours = build_hqsam(variant)
    ours.load_state_dict(official.state_dict(), strict=True)
    _assert_same_tensors(ours.state_dict(), official.state_dict())


@pytest.mark.parametrize("variant", VARIANTS)
def test_hq_head_size_equals_reference(variant: str, official_hq_keys: set[str]) -> None:
    ours, _ = _meta_pair(variant)
    state = ours.state_dict()
    assert {k for k in state if k.startswith(HQ_PREFIXES)} == official_hq_keys
    assert sum(state[k].numel() for k in official_hq_keys) == REFERENCE_HQ_PARAMS[variant]


def test_save_model_loads_strictly_into_official(tiny: torch.nn.Module, tiny_file: Path) -> None:
    official = _official("vit_tiny")
    official.load_state_dict(_load(tiny_file), strict=True)
    _assert_same_tensors(official.state_dict(), tiny.state_dict())


def test_official_checkpoint_builds_identical_model(tmp_path: Path) -> None:
    official = randomize_(_official("vit_tiny"), seed=5)
    path = tmp_path / "official.pth"
    torch.save(official.state_dict(), path)
    model = build_hqsam("vit_tiny", checkpoint=str(path))
    assert not model.training
    _assert_same_tensors(model.state_dict(), official.state_dict())


def test_save_hq_head_writes_exactly_the_hq_keys(
    tiny: torch.nn.Module, tiny_head_file: Path, official_hq_keys: set[str]
) -> None:
    head = _load(tiny_head_file)
    assert head.keys() == official_hq_keys
    state = tiny.state_dict()
    _assert_same_tensors(head, {k: state[k] for k in official_hq_keys})


# --- plain SAM checkpoints and HQ heads ----------------------------------------------------------


def test_plain_sam_checkpoint_is_refused_without_head(tiny_plain_file: Path) -> None:
    with pytest.raises(CheckpointError) as error:
        build_hqsam("vit_tiny", checkpoint=str(tiny_plain_file))
    _assert_one_line(error, str(tiny_plain_file), "--hq-head")


def test_plain_sam_checkpoint_with_head_file(
    tiny_plain_file: Path, tiny_head_file: Path, official_hq_keys: set[str]
) -> None:
    model = build_hqsam("vit_tiny", checkpoint=str(tiny_plain_file), hq_head=str(tiny_head_file))
    state = model.state_dict()
    _assert_same_tensors({k: state[k] for k in official_hq_keys}, _load(tiny_head_file))
    _assert_same_tensors(_without(state, official_hq_keys), _load(tiny_plain_file))


def test_plain_sam_checkpoint_with_random_head_is_allowed(
    tiny_plain_file: Path, official_hq_keys: set[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        model = build_hqsam("vit_tiny", checkpoint=str(tiny_plain_file), allow_random_hq_head=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(tiny_plain_file) in message for message in warnings), warnings
    state = model.state_dict()
    _assert_same_tensors(_without(state, official_hq_keys), _load(tiny_plain_file))
    assert official_hq_keys <= state.keys()


def test_official_plain_sam_vit_b_with_head(tmp_path: Path, official_hq_keys: set[str]) -> None:
    """A checkpoint of the plain `segment_anything` package plus an HQ head of ours."""
    plain = randomize_(segment_anything.sam_model_registry["vit_b"](), seed=3)
    plain_path = tmp_path / "sam_vit_b.pth"
    torch.save(plain.state_dict(), plain_path)
    with torch.device("meta"):
        head_model = build_hqsam("vit_b")
    head = {k: torch.randn(v.shape) for k, v in head_model.state_dict().items() if k in official_hq_keys}
    head_path = tmp_path / "head_vit_b.pth"
    torch.save(head, head_path)

    model = build_hqsam("vit_b", checkpoint=str(plain_path), hq_head=str(head_path))
    state = model.state_dict()
    _assert_same_tensors(_without(state, official_hq_keys), plain.state_dict())
    _assert_same_tensors({k: state[k] for k in official_hq_keys}, head)


# --- wrong variant -------------------------------------------------------------------------------


def test_checkpoint_of_another_variant(tiny_file: Path) -> None:
    with pytest.raises(CheckpointError) as error:
        build_hqsam("vit_b", checkpoint=str(tiny_file))
    _assert_one_line(error, str(tiny_file), "vit_tiny")


def test_hq_head_of_another_variant(tmp_path: Path, tiny_plain_file: Path) -> None:
    head_path = tmp_path / "head_vit_b.pth"
    save_hq_head(build_hqsam("vit_b"), str(head_path))
    with pytest.raises(CheckpointError) as error:
        build_hqsam("vit_tiny", checkpoint=str(tiny_plain_file), hq_head=str(head_path))
    _assert_one_line(error, str(head_path), "vit_b")


# --- unreadable and ill-fitting files ------------------------------------------------------------


def _corrupt(tmp_path: Path, kind: str, good: bytes) -> Path:
    path = tmp_path / f"{kind}.pth"
    if kind == "random_bytes":
        path.write_bytes(random.Random(0).randbytes(20_000))
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickled_object":
        path.write_bytes(pickle.dumps(logging.getLogger("x"), protocol=2))
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "dict_of_numbers":
        torch.save({"image_encoder.weight": 1.0}, path)
    elif kind == "list_of_tensors":
        torch.save([torch.zeros(2)], path)
    return path


@pytest.mark.parametrize(
    "kind",
    ["random_bytes", "truncated", "empty", "pickled_object", "text", "dict_of_numbers", "list_of_tensors"],
)
def test_unreadable_file_is_one_line_error(tmp_path: Path, tiny_file: Path, kind: str) -> None:
    path = _corrupt(tmp_path, kind, tiny_file.read_bytes())
    with pytest.raises(CheckpointError) as error:
        build_hqsam("vit_tiny", checkpoint=str(path))
    message = _assert_one_line(error, str(path))
    assert "weights_only" not in message  # torch's advice to turn the safe loader off is not passed on


def _broken_state(tiny: torch.nn.Module, kind: str, hq_keys: set[str]) -> tuple[dict, str]:
    state = dict(tiny.state_dict())
    plain_keys = sorted(k for k in state if k not in hq_keys)
    if kind == "missing_key":
        key = plain_keys[len(plain_keys) // 2]
        del state[key]
    elif kind == "missing_hq_key":
        key = sorted(hq_keys)[0]
        del state[key]
    elif kind == "unknown_key":
        key = "image_encoder.extra_layer.weight"
        state[key] = torch.zeros(3)
    elif kind == "wrong_shape":
        key = "mask_decoder.iou_prediction_head.layers.0.weight"
        state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    elif kind == "wrong_hq_shape":
        key = "mask_decoder.hf_token.weight"
        state[key] = torch.zeros(2, 256)
    return state, key


@pytest.mark.parametrize(
    "kind", ["missing_key", "missing_hq_key", "unknown_key", "wrong_shape", "wrong_hq_shape"]
)
def test_ill_fitting_state_dict_is_one_line_error(
    tmp_path: Path, tiny: torch.nn.Module, official_hq_keys: set[str], kind: str
) -> None:
    state, key = _broken_state(tiny, kind, official_hq_keys)
    path = tmp_path / f"{kind}.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        build_hqsam("vit_tiny", checkpoint=str(path))
    _assert_one_line(error, str(path))


def test_checkpoint_wrapped_in_model_key(tmp_path: Path, tiny: torch.nn.Module) -> None:
    path = tmp_path / "wrapped.pth"
    torch.save({"model": tiny.state_dict(), "epoch": torch.tensor(3)}, path)
    _assert_same_tensors(build_hqsam("vit_tiny", checkpoint=str(path)).state_dict(), tiny.state_dict())


# --- sources and destinations --------------------------------------------------------------------


def test_checkpoint_from_memory_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: torch.nn.Module, tiny_file: Path
) -> None:
    monkeypatch.setenv("HQSAM_CACHE", str(tmp_path / "cache"))
    memory = fsspec.filesystem("memory")
    folder = f"/hqsam-test-{uuid.uuid4().hex}"
    copied, saved = f"memory://{folder}/copied.pth", f"memory://{folder}/sub/saved.pth"
    try:
        with fsspec.open(copied, "wb") as handle:
            handle.write(tiny_file.read_bytes())
        save_model(tiny, saved)  # the non-local branch of save_model
        for uri in (copied, saved):
            _assert_same_tensors(build_hqsam("vit_tiny", checkpoint=uri).state_dict(), tiny.state_dict())
    finally:
        memory.rm(folder, recursive=True)


def test_checkpoint_from_file_uri(tiny: torch.nn.Module, tiny_file: Path) -> None:
    uri = tiny_file.resolve().as_uri()
    assert uri.startswith("file://")
    _assert_same_tensors(build_hqsam("vit_tiny", checkpoint=uri).state_dict(), tiny.state_dict())


def test_save_model_creates_folders_and_leaves_no_temp_files(tmp_path: Path, tiny: torch.nn.Module) -> None:
    path = tmp_path / "a" / "b" / "c" / "model.pth"
    save_model(tiny, str(path))
    save_model(tiny, str(path))  # overwriting works too
    _assert_same_tensors(_load(path), tiny.state_dict())
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["model.pth"]
