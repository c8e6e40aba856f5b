"""Secrets never recorded or printed, and checkpoints pinned to their sha256 (issue 12, item 11).

Credentialed and signed URLs are served by the real local HTTP server of tests/test_zoo.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.checkpoint import CheckpointError, is_hq_key, read_state_dict
from hqsam.hqsam_core.zoo import pinned
from hqsam.pipeline.train_config import TrainConfig, TrainError, record_config
from tests.conftest import shared_fixture
from tests.test_zoo import FileServer, server  # noqa: F401  (the HTTP server fixture)

SECRETS = ("s3cret", "SIGNATURE0", "CREDENTIAL0", "SESSIONTOKEN0", "sigvalue0", "tokenvalue0")


def signed(url: str) -> str:
    """`url` with a password and every kind of secret query parameter the issue names."""
    scheme, rest = url.split("://", 1)
    return (
        f"{scheme}://alice:s3cret@{rest}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=CREDENTIAL0"
        "&X-Amz-Security-Token=SESSIONTOKEN0&X-Amz-Signature=SIGNATURE0&sig=sigvalue0&token=tokenvalue0"
    )


def assert_no_secret(text: str) -> None:
    leaked = [secret for secret in SECRETS if secret in text]
    assert not leaked, f"{leaked} in {text!r}"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://alice:s3cret@host/w.pth", "https://***@host/w.pth"),
        ("s3://KEY:s3cret@bucket/w.pth", "s3://***@bucket/w.pth"),
        (
            "https://b.s3.amazonaws.com/w.pth?X-Amz-Credential=CREDENTIAL0&X-Amz-Date=20260101"
            "&X-Amz-Security-Token=SESSIONTOKEN0&X-Amz-Signature=SIGNATURE0",
            "https://b.s3.amazonaws.com/w.pth?X-Amz-Credential=***&X-Amz-Date=20260101"
            "&X-Amz-Security-Token=***&X-Amz-Signature=***",
        ),
        (
            "https://acct.blob.core.windows.net/c/w.pth?sv=2022&sig=sigvalue0",
            "https://acct.blob.core.windows.net/c/w.pth?sv=2022&sig=***",
        ),
        ("https://host/w.pth?token=tokenvalue0&v=a%26b", "https://host/w.pth?token=***&v=a%26b"),
        ("https://host/w.pth#access_token=tokenvalue0", "https://host/w.pth#access_token=***"),
        ("https://host/w.pth#sha256=" + "a" * 64, "https://host/w.pth#sha256=" + "a" * 64),
        ("/local/path/w.pth", "/local/path/w.pth"),
    ],
)
def test_redact_hides_credentials_and_signatures_and_keeps_the_rest(uri: str, shown: str) -> None:
    assert storage.redact(uri) == shown
    assert_no_secret(storage.redact(uri))


def test_training_record_holds_no_secret_and_resumes_across_new_signatures(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = TrainConfig(
        data=[signed("https://h/coco.json") + "::weight=2"],
        out=str(out),
        checkpoint=signed("https://h/sam.pth"),
        hq_head=signed("s3://b/head.pth"),
        val=[signed("https://h/val.json")],
    )
    record_config(config)
    text = (out / "train_config.json").read_text()
    assert_no_secret(text)
    recorded = json.loads(text)
    assert recorded["checkpoint"].startswith("https://***@h/sam.pth?X-Amz-Algorithm=AWS4-HMAC-SHA256")
    assert recorded["data"][0].endswith("::weight=2") and recorded["hq_head"].startswith(
        "s3://***@b/head.pth"
    )

    # A fresh signature of the same objects, then a pin added: the same run, resumed.
    config.checkpoint = config.checkpoint.replace("SIGNATURE0", "SIGNATURE1")
    record_config(config)
    config.checkpoint = pinned(config.checkpoint, "a" * 64)
    record_config(config)
    assert json.loads((out / "train_config.json").read_text())["checkpoint"].endswith("#sha256=" + "a" * 64)
    config.checkpoint = pinned(config.checkpoint.split("#")[0], "b" * 64)  # another file: refused
    with pytest.raises(TrainError, match="holds a run with another checkpoint") as err:
        record_config(config)
    assert_no_secret(str(err.value))


def test_checkpoint_errors_never_show_credentials(
    server: FileServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_checkpoint: Path,
) -> None:
    from hqsam.hqsam_core.build import build_hqsam

    monkeypatch.setenv("HQSAM_CACHE", str(tmp_path / "cache"))
    server.files["/garbage.pth"] = b"not a checkpoint"
    with pytest.raises(CheckpointError) as err:
        read_state_dict(signed(f"{server.url}/garbage.pth"))
    assert "/garbage.pth" in str(err.value) and "not a readable PyTorch checkpoint" in str(err.value)
    assert_no_secret(str(err.value))

    plain_sam = tmp_path / "plain.pth"
    state = torch.load(tiny_checkpoint, weights_only=True)
    torch.save({key: value for key, value in state.items() if not is_hq_key(key)}, plain_sam)
    server.files["/plain.pth"] = plain_sam.read_bytes()
    with pytest.raises(CheckpointError, match="is a plain SAM checkpoint") as err:
        build_hqsam("vit_tiny", signed(f"{server.url}/plain.pth"))
    assert_no_secret(str(err.value))


# ---------------------------------------------------------------- --checkpoint-sha256 in every command


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _command_args(name: str, tmp_path: Path, checkpoint: Path) -> list[str]:
    fixture = shared_fixture("labelme-voc")
    coco = f"{fixture / 'annotations.json'}::images={fixture}"
    common = ["--checkpoint", str(checkpoint), "--device", "cpu"]
    return {
        "refine": ["refine", str(fixture / "annotations.json"), "--out", str(tmp_path / "out"), *common],
        "train": ["train", "--data", coco, "--out", str(tmp_path / "run"), "--batch-size", "1", *common],
        "evaluate": ["evaluate", "--data", coco, "--out", str(tmp_path / "r.json"), "--limit", "1", *common],
        "predict": [
            "predict",
            str(fixture / "JPEGImages" / "2011_000003.jpg"),
            "--box",
            "10,10,200,200",
            "--out",
            str(tmp_path / "pred"),
            *common,
        ],
    }[name]


@pytest.mark.parametrize("command", ["refine", "train", "evaluate", "predict"])
def test_every_command_refuses_a_checkpoint_of_another_sha256(
    command: str, tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hqsam.jobs.cli import app

    for name in ("RAY_ADDRESS", "HQSAM_IN_RAY_JOB", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(name, raising=False)
    args = _command_args(command, tmp_path, tiny_checkpoint)
    wrong = "0" * 64
    result = CliRunner().invoke(app, [*args, "--checkpoint-sha256", wrong])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert f"has sha256 {_sha256(tiny_checkpoint)}, not the pinned {wrong}" in line
    assert "Traceback" not in result.output

    malformed = CliRunner().invoke(app, [*args, "--checkpoint-sha256", "abc"])
    assert malformed.exit_code == 2 and "64 hexadecimal digits" in malformed.output


@pytest.mark.slow
def test_a_matching_pin_runs(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from hqsam.jobs.cli import app

    args = _command_args("predict", tmp_path, tiny_checkpoint)
    result = CliRunner().invoke(app, [*args, "--checkpoint-sha256", _sha256(tiny_checkpoint).upper()])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pred" / "2011_000003_mask0.png").is_file()


# ---------------------------------------------------------------- summary.json of a refine run


@pytest.mark.slow
def test_refine_records_and_prints_no_secret_of_a_signed_checkpoint_url(
    ray_session,
    server: FileServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from hqsam.pipeline.refine_pipeline import RefineSettings
    from hqsam.pipeline.refine_run import RefineConfig, run_refine
    from hqsam.pipeline.refine_summary import summary_lines

    monkeypatch.setenv("HQSAM_CACHE", str(tmp_path / "cache"))
    server.files["/tiny.pth"] = tiny_checkpoint.read_bytes()
    checkpoint = pinned(signed(f"{server.url}/tiny.pth"), _sha256(tiny_checkpoint))
    fixture = shared_fixture("labelme-voc")
    out = tmp_path / "out"
    settings = RefineSettings("vit_tiny", checkpoint, None, "cpu")
    summary = run_refine(
        RefineConfig(annotations=str(fixture / "annotations.json"), out=str(out), settings=settings, limit=1),
        progress=False,
    )
    assert summary["checkpoint_sha256"] == _sha256(tiny_checkpoint)
    assert summary["checkpoint"].startswith(f"http://***@{server.url.removeprefix('http://')}/tiny.pth?")
    assert summary["checkpoint"].endswith(f"#sha256={_sha256(tiny_checkpoint)}")
    for path in out.rglob("*"):  # summary.json and every other file run_refine left in OUT
        if path.is_file() and path.suffix in (".json", ""):
            assert_no_secret(path.read_text(errors="replace"))
    assert_no_secret("\n".join(summary_lines(summary)) + capsys.readouterr().err)
