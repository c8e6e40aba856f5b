"""`--checkpoint random` / `build_hqsam(variant, "random")` (issue 13 point 7): one fixed seed in every
process, refused where it would pass for real annotations, and marked in every output row."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import hqsam.hqsam_core.random_weights as core_random_weights
import hqsam.hqsam_core.testing.random_weights as testing_random_weights
from hqsam.hqsam_core import build_hqsam
from hqsam.hqsam_core.build import check_checkpoint
from hqsam.hqsam_core.checkpoint import CheckpointError
from hqsam.hqsam_core.random_weights import RANDOM_WEIGHTS, RANDOM_WEIGHTS_SEED, randomize_
from hqsam.hqsam_core.zoo import CheckpointSourceError, pinned, sha256_file
from hqsam.jobs.cli import app
from hqsam.pipeline.read_refined import part_files, read_part_files
from hqsam.pipeline.refine_pipeline import RefineSettings, refine_stages
from hqsam.pipeline.run_identity import read_identity, run_identity, weights_label
from tests.conftest import ROOT
from tests.test_out_safety import write_local_dataset
from tests.test_refine_prechecks import the_error

STATE_HASH = """
import hashlib, sys
from hqsam.hqsam_core import build_hqsam
digest = hashlib.sha256()
for key, value in build_hqsam(sys.argv[1], "random").state_dict().items():
    digest.update(key.encode() + value.contiguous().numpy().tobytes())
print(digest.hexdigest())
"""


def state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode() + value.contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_random_weights_are_the_same_in_every_process_whatever_the_global_seed() -> None:
    torch.manual_seed(123)
    first = state_hash(build_hqsam("vit_tiny", RANDOM_WEIGHTS))
    torch.manual_seed(456)
    torch.rand(1000)
    assert state_hash(build_hqsam("vit_tiny", RANDOM_WEIGHTS)) == first
    # another process (another actor, another node) builds the very same weights
    done = subprocess.run(
        [sys.executable, "-c", STATE_HASH, "vit_tiny"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == first
    assert "meaningless" in done.stderr  # the Python API warns too
    # random weights, not PyTorch's default initialisation
    assert state_hash(build_hqsam("vit_tiny")) != first
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    assert state_hash(randomize_(build_hqsam("vit_tiny"), seed=RANDOM_WEIGHTS_SEED)) == first


def test_testing_re_exports_the_one_randomizer() -> None:
    assert testing_random_weights.randomize_ is core_random_weights.randomize_


def test_the_model_and_refine_path_never_import_the_testing_package() -> None:
    importers = []
    for folder in ("hqsam_core", "pipeline", "jobs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "testing" in path.relative_to(ROOT).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                if any("hqsam_core.testing" in name for name in names):
                    importers.append(str(path.relative_to(ROOT)))
    assert importers == []


def test_random_weights_take_no_hq_head_and_no_pin(tmp_path: Path) -> None:
    check_checkpoint("vit_tiny", RANDOM_WEIGHTS)  # no file to read: nothing to refuse
    head = str(tmp_path / "head.pth")
    for build in (build_hqsam, check_checkpoint):
        with pytest.raises(CheckpointError) as refused:
            build("vit_tiny", RANDOM_WEIGHTS, head)
        assert "random weights take no HQ head" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(CheckpointSourceError, match="Random weights have no file"):
        pinned(RANDOM_WEIGHTS, "a" * 64)


def test_the_model_label_traces_the_weights(tmp_path: Path, tiny_checkpoint: Path) -> None:
    annotations = tmp_path / "coco.json"
    annotations.write_text(json.dumps({"images": [], "annotations": []}))
    random = RefineSettings("vit_tiny", RANDOM_WEIGHTS, None, "cpu")
    identity = run_identity(str(annotations), None, random, None)
    assert identity["checkpoint_sha256"] == "random" and identity["checkpoint_uri"] == "random"
    assert weights_label(identity) == "vit_tiny:random"

    real = RefineSettings("vit_tiny", str(tiny_checkpoint), None, "cpu")
    digest = sha256_file(tiny_checkpoint)
    identity = run_identity(str(annotations), None, real, tiny_checkpoint)
    assert weights_label(identity) == f"vit_tiny:sha256={digest[:12]}"
    with_head = identity | {"hq_head_sha256": "b" * 64}
    assert weights_label(with_head) == f"vit_tiny:sha256={digest[:12]}+hq_head:sha256={'b' * 12}"

    labelled = dataclasses.replace(random, model_label="vit_tiny:random")
    assert refine_stages(str(tmp_path / "out"), labelled)[-1].model == "vit_tiny:random"
    assert refine_stages(str(tmp_path / "out"), random)[-1].model == "vit_tiny"  # no label: the variant


def refine_cli(*args: object):
    return CliRunner().invoke(
        app, ["refine", *map(str, args), "--device", "cpu", "--threads", "1", "--no-progress"]
    )


def test_random_weights_refuse_to_write_coco_annotations_without_overwrite(tmp_path: Path) -> None:
    path = write_local_dataset(tmp_path / "data")
    out = tmp_path / "out"
    message = the_error(refine_cli(path, "--out", out, "--checkpoint", "random", "--format", "coco"))
    assert "meaningless" in message and "--overwrite" in message
    assert not out.exists()
    result = refine_cli(path, "--out", out, "--checkpoint", "random", "--checkpoint-sha256", "a" * 64)
    assert "Random weights have no file" in the_error(result)
    assert not out.exists()


def summary_of(result) -> dict:
    """The summary.json the run's last line names."""
    line = next(line for line in result.stdout.splitlines() if line.startswith("summary "))
    return json.loads(Path(line.split()[-1]).read_text())


@pytest.mark.slow
def test_a_dry_run_marks_every_row_and_real_weights_are_traced(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = write_local_dataset(tmp_path / "data")
    out = tmp_path / "out"
    result = refine_cli(path, "--out", out, "--checkpoint", "random", "--format", "coco", "--overwrite")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert any(
        line.startswith("hqsam: warning:") and "meaningless" in line for line in result.stderr.splitlines()
    )
    rows = read_part_files(part_files(str(out)), ["model", "status"])
    assert rows.num_rows == 4 and set(rows["model"].to_pylist()) == {"vit_tiny:random"}
    summary = summary_of(result)
    assert summary["model"] == "vit_tiny:random" and summary["checkpoint_sha256"] == "random"
    assert read_identity(str(out))["checkpoint_sha256"] == "random"
    assert (out / "annotations.json").exists()  # --overwrite: written as asked

    again = refine_cli(path, "--out", out, "--checkpoint", "random", "--format", "coco", "--resume")
    assert "meaningless" in the_error(again)  # a resume into COCO needs --overwrite too, so refused
    resumed = refine_cli(path, "--out", out, "--checkpoint", "random", "--resume")
    assert resumed.exit_code == 0, (resumed.stdout, resumed.stderr)
    assert summary_of(resumed)["images_resumed"] == 2
    real = refine_cli(path, "--out", out, "--checkpoint", tiny_checkpoint, "--resume")
    assert "checkpoint_sha256 'random' there" in the_error(real)

    other = tmp_path / "real"
    result = refine_cli(path, "--out", other, "--checkpoint", tiny_checkpoint)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    digest = sha256_file(tiny_checkpoint)
    rows = read_part_files(part_files(str(other)), ["model"])
    assert set(rows["model"].to_pylist()) == {f"vit_tiny:sha256={digest[:12]}"}
    summary = summary_of(result)
    assert summary["model"] == f"vit_tiny:sha256={digest[:12]}"
    assert summary["checkpoint_sha256"] == digest == read_identity(str(other))["checkpoint_sha256"]
