"""The run identity recorded in OUT (pipeline/run_identity.py): what it holds, what a resume must
match, and that recorded URIs carry no secrets."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from hqsam.hqsam_core import storage
from hqsam.pipeline.refine_pipeline import RefineSettings
from hqsam.pipeline.run_identity import (
    ENDS_BYTES,
    RUN_RECORD,
    RunMismatchError,
    check_same_job,
    input_fingerprint,
    read_identity,
    record_identity,
    run_identity,
)


@pytest.fixture()
def job(tmp_path, tiny_checkpoint):
    annotations = tmp_path / "coco.json"
    annotations.write_text(json.dumps({"images": [], "annotations": []}))
    settings = RefineSettings("vit_tiny", str(tiny_checkpoint), None, "cpu")
    return str(annotations), settings, tiny_checkpoint


def test_identity_holds_what_decides_the_masks_and_not_the_throughput_knobs(job) -> None:
    annotations, settings, checkpoint = job
    identity = run_identity(annotations, None, settings, checkpoint)
    assert identity["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert identity["images"] == storage.parent(annotations) and identity["model"] == "vit_tiny"
    assert identity["annotations_size"] == len(open(annotations, "rb").read())
    assert (identity["box_source"], identity["hq_token_only"], identity["crop_zoom"]) == ("bbox", False, None)
    knobs = dataclasses.replace(
        settings, device="cuda", batch_size=9, min_actors=2, max_actors=4, max_prompts=3, torch_threads=7
    )
    knobs = dataclasses.replace(knobs, precision="bf16", compile=True, images_per_file=5)
    assert run_identity(annotations, None, knobs, checkpoint) == identity


def test_a_resume_of_another_job_is_refused_naming_what_differs(job, tmp_path) -> None:
    annotations, settings, checkpoint = job
    out = str(tmp_path / "out")
    identity = run_identity(annotations, None, settings, checkpoint)
    check_same_job(out, identity)  # nothing recorded: nothing to differ
    record_identity(out, identity, resume=False)
    assert read_identity(out) == identity
    check_same_job(out, identity)

    other = run_identity(
        annotations, None, dataclasses.replace(settings, box_source="segmentation"), checkpoint
    )
    other |= {"checkpoint_sha256": "0" * 64}
    with pytest.raises(RunMismatchError) as refused:
        check_same_job(out, other)
    message = str(refused.value)
    assert refused.value.exit_code == 2 and "\n" not in message
    assert "box_source 'bbox' there, 'segmentation' now" in message
    assert "checkpoint_sha256" in message and "--overwrite" in message
    assert "crop_zoom" not in message and "model" not in message

    moved = identity | {"annotations_uri": "s3://elsewhere/coco.json", "checkpoint_uri": "s3://w/x.pth"}
    check_same_job(out, moved)  # the same bytes at another address: the same job
    record_identity(out, moved, resume=True)
    assert read_identity(out) == moved


def test_a_changed_input_file_at_the_same_uri_is_another_job(tmp_path) -> None:
    small = tmp_path / "small.json"
    small.write_bytes(b"x" * 100)
    assert input_fingerprint(str(small)) == (100, hashlib.sha256(b"x" * 100).hexdigest())
    big = tmp_path / "big.json"
    content = bytearray(b"a" * (3 * ENDS_BYTES))
    big.write_bytes(content)
    before = input_fingerprint(str(big))
    content[-1:] = b"b"  # the last byte
    big.write_bytes(content)
    assert input_fingerprint(str(big)) != before
    content[-1:] = b"a"
    content[0:1] = b"b"  # the first byte
    big.write_bytes(content)
    assert input_fingerprint(str(big)) != before
    big.write_bytes(content + b"a")  # a byte more
    assert input_fingerprint(str(big))[0] == 3 * ENDS_BYTES + 1


def test_input_fingerprint_on_s3_reads_only_the_ends(s3_bucket) -> None:
    content = b"".join(bytes([i % 251]) for i in range(3 * ENDS_BYTES))
    uri = f"s3://{s3_bucket}/in/big.json"
    storage.write_bytes(uri, content)
    ends = hashlib.sha256(content[:ENDS_BYTES] + content[-ENDS_BYTES:]).hexdigest()
    assert input_fingerprint(uri) == (len(content), ends)


def test_recorded_uris_carry_no_secrets(job, tmp_path) -> None:
    annotations, settings, checkpoint = job
    secret = "X-Amz-Signature=abcdef0123456789"
    signed = dataclasses.replace(settings, checkpoint=f"https://host/w.pth?{secret}")
    identity = run_identity(annotations, None, signed, checkpoint)
    record_identity(str(tmp_path / "out"), identity, resume=False)
    recorded = (tmp_path / "out" / RUN_RECORD).read_text()
    assert "abcdef0123456789" not in recorded and "https://host/w.pth" in recorded


def test_input_fingerprint_of_a_folder_of_manifest_parts(tmp_path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    for name in ("part-0.parquet", "part-1.parquet", "part-2.parquet"):
        (folder / name).write_bytes(name.encode() * 10)
    (folder / "_SUCCESS").write_bytes(b"")
    before = input_fingerprint(str(folder))
    assert before[0] == 3 * 140 and input_fingerprint(str(folder)) == before  # the same in any process
    (folder / "part-1.parquet").write_bytes(b"y" * 141)  # a middle part of another size
    assert input_fingerprint(str(folder)) != before
    (folder / "part-1.parquet").write_bytes(b"part-1.parquet" * 10)
    assert input_fingerprint(str(folder)) == before
    (folder / "part-2.parquet").write_bytes(b"PART-2.parquet" * 10)  # the last part, same size
    assert input_fingerprint(str(folder)) != before
