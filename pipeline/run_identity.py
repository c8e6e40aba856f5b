"""The identity of a refine run, recorded in OUT/_hqsam_run.json, so that a --resume continues the
same job and never mixes the rows of another input, model, checkpoint or prompt into OUT.

The identity holds what decides the masks: the input file (its size and a hash of its first and last
MiB, so that a changed file at the same URI is caught without reading all of it), the images root,
the model, the weights (sha256 of the checkpoint and HQ head files; "random" for random weights),
the box source, --hq-token-only and --crop-zoom. It leaves out what only changes speed or numerics
(batch size, actors, threads, prompts per decoder call, device, precision, compile): a resume may use
another machine. URIs are recorded redacted.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError
from hqsam.hqsam_core.random_weights import RANDOM_WEIGHTS, is_random_weights
from hqsam.hqsam_core.zoo import fetch_checkpoint, file_sha256
from hqsam.pipeline.read_refined import part_files
from hqsam.pipeline.refine_pipeline import RefineSettings
from hqsam.pipeline.stream_coco import TASKS_RECORD, manifest_parts

log = logging.getLogger(__name__)

RUN_RECORD = "_hqsam_run.json"
ENDS_BYTES = 2**20  # the input fingerprint hashes this much of each end of the file
# Recorded for people, not compared: the same bytes may be resumed from another path or mirror.
INFORMATIVE = ("annotations_uri", "checkpoint_uri", "hq_head_uri")


class RunMismatchError(HqsamError):
    """--resume into an OUT that holds another job's rows."""


def run_identity(
    annotations: str, images: str | None, settings: RefineSettings, checkpoint: Path | None
) -> dict:
    """The identity of a run over `annotations`; `checkpoint` is the local file of the weights (None
    for random weights)."""
    size, ends = input_fingerprint(annotations)
    hq_head = fetch_checkpoint(settings.hq_head) if settings.hq_head else None
    random = is_random_weights(settings.checkpoint)
    return {
        "annotations_uri": storage.redact(annotations),
        "annotations_size": size,
        "annotations_sha256_of_ends": ends,
        "images": storage.redact(images or storage.parent(annotations)),
        "model": settings.variant,
        "checkpoint_uri": storage.redact(settings.checkpoint),
        "checkpoint_sha256": RANDOM_WEIGHTS if random else file_sha256(checkpoint),
        "hq_head_uri": storage.redact(settings.hq_head),
        "hq_head_sha256": hq_head and file_sha256(hq_head),
        "box_source": settings.box_source,
        "hq_token_only": settings.hq_token_only,
        "crop_zoom": settings.crop_zoom,
    } | _non_default_settings(settings)


def _non_default_settings(settings: RefineSettings) -> dict:
    """The prompt, cleaning and policy settings where they differ from the defaults, so that an OUT
    written before they existed resumes under the defaults."""
    defaults = RefineSettings(variant="", checkpoint="", hq_head=None, device="")
    names = ("prompt", "prompt_rounds", "prompt_points", "prompt_trials", "min_region_area", "accept")
    return {
        name: getattr(settings, name) for name in names if getattr(settings, name) != getattr(defaults, name)
    }


def weights_label(identity: dict) -> str:
    """The `model` of a run's output rows: its variant and a trace of its weights, e.g.
    vit_b:sha256=<first 12 hex of the checkpoint's>, +hq_head:sha256=<...> with an HQ head file,
    or vit_tiny:random."""
    model, checkpoint = identity["model"], identity["checkpoint_sha256"]
    if checkpoint == RANDOM_WEIGHTS:
        return f"{model}:{RANDOM_WEIGHTS}"
    head = identity.get("hq_head_sha256")
    return f"{model}:sha256={checkpoint[:12]}" + (f"+hq_head:sha256={head[:12]}" if head else "")


def input_fingerprint(uri: str) -> tuple[int, str]:
    """(size, sha256 of the first and last ENDS_BYTES) of a file, local or remote; of a task
    folder's record (pipeline/stream_coco.py) for a task folder; for a folder of Parquet manifest
    parts, their total size and a hash of their names and sizes and of the first and last part's
    fingerprints (a read of each part's ends would cost two requests per part on object storage)."""
    fs, path = storage.url_to_fs(uri)
    if not fs.isdir(path):
        return _file_fingerprint(uri)
    record = storage.join(uri, TASKS_RECORD)
    if storage.exists(record):
        return _file_fingerprint(record)
    parts = manifest_parts(uri) or []
    digest, total = hashlib.sha256(), 0
    for part in parts:
        size = fs.size(storage.url_to_fs(part)[1])
        digest.update(f"{part.rsplit('/', 1)[-1]}:{size}\n".encode())
        total += size
    for part in dict.fromkeys([parts[0], parts[-1]]):
        digest.update(_file_fingerprint(part)[1].encode())
    return total, digest.hexdigest()


def _file_fingerprint(uri: str) -> tuple[int, str]:
    fs, path = storage.url_to_fs(uri)
    size = fs.size(path)
    if size is None or size <= 2 * ENDS_BYTES:
        data = storage.read_bytes(uri)
        return len(data), hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256(fs.cat_file(path, start=0, end=ENDS_BYTES))
    digest.update(fs.cat_file(path, start=size - ENDS_BYTES, end=size))
    return size, digest.hexdigest()


def record_uri(out: str) -> str:
    return storage.join(out, RUN_RECORD)


def read_identity(out: str) -> dict | None:
    """The identity recorded in OUT, None when OUT has none."""
    try:
        identity = storage.read_json(record_uri(out))["identity"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):  # unreadable: nothing in it can match
        return {}
    return identity if isinstance(identity, dict) else {}


def check_same_job(out: str, identity: dict) -> None:
    """Raise RunMismatchError, naming what differs, when OUT records another job than `identity`."""
    recorded = read_identity(out)
    if recorded is None:
        return
    differences = [
        f"{key} {recorded.get(key)!r} there, {identity.get(key)!r} now"
        for key in identity
        if key not in INFORMATIVE and recorded.get(key) != identity.get(key)
    ]
    if differences:
        raise RunMismatchError(
            f"{storage.redact(out)} holds the rows of another job ({'; '.join(differences)}); resume with "
            "the same input and settings, or pass --overwrite or another --out to start over"
        )


def record_identity(out: str, identity: dict, *, resume: bool) -> None:
    """Write OUT/_hqsam_run.json for a new run; a resume keeps the record it checked (or, in an OUT
    written before records existed, adds one with a warning)."""
    recorded = read_identity(out) if resume else None
    if recorded == identity:
        return
    if resume and recorded is None and part_files(out):
        log.warning("%s has no run record: cannot check it holds this job's rows", storage.redact(out))
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    storage.write_json(record_uri(out), {"identity": identity, "started": started})
