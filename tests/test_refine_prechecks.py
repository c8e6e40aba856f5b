"""`hqsam refine` checks what it can before OUT is created (issue 12 items 10 and 12): a CUDA device
on a Ray without GPUs and COCO output from a Parquet manifest are refused in one sentence, leaving no
OUT; the summary records the hash the run identity computed; the command stays short."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from hqsam.jobs.cli import app
from hqsam.pipeline.out_tally import OutTally
from hqsam.pipeline.refine_pipeline import RefineSettings
from hqsam.pipeline.refine_run import RefineConfig
from hqsam.pipeline.refine_summary import account
from hqsam.pipeline.stream_coco import stream_coco
from hqsam.schemas.manifest import PARQUET_MANIFEST
from tests.conftest import ROOT
from tests.test_out_safety import H, W, coco_of, write_local_dataset


def the_error(result, code: int = 2) -> str:
    """The one `error:` line of a refused invocation (a Ray this test process started earlier may
    add a line saying where its logs are)."""
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def parquet_manifest(root: Path) -> Path:
    """The images of write_local_dataset as a Parquet manifest."""
    annotations = [
        {"id": a["id"], "category_id": 1, "bbox": a["bbox"], "iscrowd": 0, "segmentation": None}
        for a in coco_of(2)["annotations"]
    ]
    manifest = [
        {"image_id": i, "image_uri": f"{i}.png", "width": W, "height": H}
        | {"annotations": [a for a in annotations if a["id"] // 2 == i]}
        for i in range(2)
    ]
    path = root / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(manifest, schema=PARQUET_MANIFEST), path)
    return path


def test_coco_output_from_a_parquet_manifest_is_refused_before_out_exists(tiny_checkpoint, tmp_path) -> None:
    write_local_dataset(tmp_path / "data")
    path = parquet_manifest(tmp_path / "data")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["refine", str(path), "--out", str(out), "--checkpoint", str(tiny_checkpoint)]
        + ["--format", "coco", "--device", "cpu", "--no-progress"],
    )
    message = the_error(result)
    assert "Parquet manifest" in message and "--format parquet" in message
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda is no mistake")
def test_cuda_on_a_ray_without_gpus_is_refused_before_out_exists(tiny_checkpoint, tmp_path) -> None:
    path = write_local_dataset(tmp_path / "data")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["refine", str(path), "--out", str(out), "--checkpoint", str(tiny_checkpoint)]
        + ["--device", "cuda", "--no-progress"],
    )
    message = the_error(result)
    assert "needs a GPU" in message and "--device cpu" in message
    assert not out.exists()


def test_the_summary_records_the_hash_the_run_identity_computed(tiny_checkpoint, tmp_path) -> None:
    path = write_local_dataset(tmp_path / "data")
    tasks = stream_coco(str(path), str(tmp_path / "tasks"))
    settings = RefineSettings(
        "vit_tiny", str(tiny_checkpoint), None, "cpu", model_label="vit_tiny:sha256=c0ffee"
    )
    config = RefineConfig(str(path), str(tmp_path / "out"), settings=settings)
    nothing = OutTally.nothing_written(tasks)
    summary = account(config, tasks, nothing, nothing, 1.0, "c0ffee" * 10 + "abcd")
    assert summary["checkpoint_sha256"] == "c0ffee" * 10 + "abcd"  # as given: the file is not hashed again
    assert summary["model"] == "vit_tiny:sha256=c0ffee"
    json.dumps(summary)


def test_every_function_of_the_refine_job_is_short() -> None:
    """Thin: the command's code (past its option declarations and docstring) is a few lines."""
    tree = ast.parse((ROOT / "jobs" / "refine.py").read_text())
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    code = {node.name: node.end_lineno - _code_start(node) + 1 for node in functions}
    assert code["refine"] <= 15 and max(code.values()) <= 50, code


def _code_start(function: ast.FunctionDef) -> int:
    first = function.body[0]
    docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    return function.body[1].lineno if docstring and len(function.body) > 1 else first.lineno


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--accept", "stabilty >= 0.9"], "error: --accept: unknown column 'stabilty' at character 1"),
        (["--accept", "stability >= 0.9 and"], "error: --accept: unexpected end of expression after 'and'"),
        (["--prompt", "box+mask", "--crop-zoom", "0.25"], "error: --crop-zoom refines box prompts only"),
    ],
)
def test_a_bad_policy_or_prompt_is_refused_before_out_exists(
    tiny_checkpoint, tmp_path, options, expected
) -> None:
    path = write_local_dataset(tmp_path / "data")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["refine", str(path), "--out", str(out)]
        + ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--no-progress", *options],
    )
    assert the_error(result).startswith(expected)
    assert not out.exists()
