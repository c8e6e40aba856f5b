"""One `hqsam refine` run: OUT policy, resume, the Ray run of the chain, and the accounting of every
annotation (OUT/summary.json, the exit code)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.build import check_checkpoint
from hqsam.hqsam_core.errors import HqsamError
from hqsam.hqsam_core.version import versions
from hqsam.hqsam_core.zoo import fetch_checkpoint, sha256_file
from hqsam.pipeline.cluster import GPU_WAIT_S, init_ray, on_cluster, wait_for_gpus
from hqsam.pipeline.manifest import (
    annotation_count,
    duplicate_annotation_ids,
    first_images,
    image_count,
    read_manifest,
)
from hqsam.pipeline.out_lease import STALE_AFTER_S, out_lease, refuse_if_leased
from hqsam.pipeline.read_refined import PART_PREFIX, read_parts
from hqsam.pipeline.refine_pipeline import RefineSettings, build_refine_dataset
from hqsam.pipeline.run_identity import check_same_job, record_identity, run_identity
from hqsam.pipeline.write_coco import write_coco
from hqsam.pipeline.write_leftovers import write_leftovers
from hqsam.schemas.status import NOT_FAILURES, Status

log = logging.getLogger(__name__)

OUR_OUTPUTS = ("annotations.json", "summary.json")
URI_SETTINGS = ("checkpoint", "hq_head")  # recorded redacted: a signed URL carries its secret
# What --overwrite removes besides OUR_OUTPUTS: part files and the temp files of killed writers.
OUR_PREFIXES = (PART_PREFIX, f".{PART_PREFIX}", ".annotations.json", ".summary.json")
# The run's lease and identity record (and their temp files): OUT holding only these holds no output.
BOOKKEEPING = ("_hqsam_", "._hqsam_")


class OutputNotEmptyError(HqsamError):
    """OUT already holds files and neither --resume nor --overwrite was given."""


@dataclass
class RefineConfig:
    annotations: str
    out: str
    images: str | None = None
    format: str = "parquet"  # parquet | coco
    settings: RefineSettings = field(
        default_factory=lambda: RefineSettings("vit_tiny", "sam_hq_vit_tiny", None, "cpu")
    )
    resume: bool = False
    overwrite: bool = False
    limit: int | None = None
    max_error_rate: float = 0.01
    lease_timeout_s: float = STALE_AFTER_S  # another run takes over a lease not renewed for this long
    gpu_wait_s: float = GPU_WAIT_S  # --device cuda on an autoscaling cluster: how long to wait for a GPU


def run_refine(config: RefineConfig, *, progress: bool = True) -> dict:
    """Run the whole job; returns the summary (also written to OUT/summary.json). Everything that can
    be checked is checked before anything is created in OUT; the run then holds OUT's lease to its end."""
    started = time.time()
    config = with_absolute_paths(config)
    tasks, checkpoint_path, identity = check_job(config)
    with out_lease(config.out, stale_after_s=config.lease_timeout_s):
        claim_out(config, identity)
        return refine_into_out(config, tasks, checkpoint_path, started, progress)


def check_job(config: RefineConfig) -> tuple[pa.Table, Path, dict]:
    """What can fail before OUT is touched, cheapest first: another run in OUT, the OUT policy, the
    annotation file, the weights, and on --resume that OUT holds this same job. Returns the task rows,
    the local checkpoint file and the run's identity (pipeline/run_identity.py)."""
    settings = config.settings
    refuse_if_leased(config.out)
    check_out(config.out, resume=config.resume, overwrite=config.overwrite)
    tasks = read_manifest(config.annotations, config.images).tasks
    if config.limit is not None:
        tasks = first_images(tasks, config.limit)
    checkpoint_path = fetch_checkpoint(settings.checkpoint)
    check_checkpoint(settings.variant, settings.checkpoint, settings.hq_head)  # before any actor starts
    identity = run_identity(config.annotations, config.images, settings, checkpoint_path)
    if config.resume:
        check_same_job(config.out, identity)
    return tasks, checkpoint_path, identity


def claim_out(config: RefineConfig, identity: dict) -> None:
    """Under OUT's lease: OUT checked again (another run may have written it since the first check),
    made or cleared, and the run's identity recorded in it."""
    prepare_out(config.out, resume=config.resume, overwrite=config.overwrite)
    if config.resume:
        check_same_job(config.out, identity)
    record_identity(config.out, identity, resume=config.resume)


def refine_into_out(
    config: RefineConfig, tasks: pa.Table, checkpoint_path: Path, started: float, progress: bool
) -> dict:
    """Refine the tasks OUT has no rows of yet, write the COCO file if asked, and account for every
    annotation of `tasks`."""
    settings = config.settings
    remaining = not_yet_written(tasks, config.out)
    log.info(
        "%d images to refine, %d already in %s",
        image_count(remaining),
        image_count(tasks) - image_count(remaining),
        storage.redact(config.out),
    )
    if remaining.num_rows:
        init_ray()
        with requested_resources(settings):
            wait_for_gpus(settings.device, config.gpu_wait_s)
            crash = None
            try:
                dataset = build_refine_dataset(remaining, config.out, settings)
                _consume(dataset, annotation_count(remaining), progress)
            except Exception as error:  # a failed run still ends with one row per annotation
                crash = error
            write_leftovers(remaining, config.out, settings, crash)
    if config.format == "coco":
        write_coco(config.annotations, config.out, only_processed_images=config.limit is not None)
    summary = account(config, tasks, remaining, time.time() - started, checkpoint_path)
    storage.write_json(storage.join(config.out, "summary.json"), summary)
    return summary


def with_absolute_paths(config: RefineConfig) -> RefineConfig:
    """Local paths made absolute: Ray workers need not share this process's working directory
    (in a Ray job they run in the job's working_dir). A checkpoint that is no local file stays as
    it is: a URI, or a zoo name such as sam_hq_vit_tiny."""

    def if_local_file(uri: str | None) -> str | None:
        return storage.absolute(uri) if uri and os.path.exists(uri) else uri

    settings = dataclasses.replace(
        config.settings,
        checkpoint=if_local_file(config.settings.checkpoint),
        hq_head=if_local_file(config.settings.hq_head),
    )
    return dataclasses.replace(
        config,
        annotations=storage.absolute(config.annotations),
        out=storage.absolute(config.out),
        images=config.images and storage.absolute(config.images),
        settings=settings,
    )


def prepare_out(out: str, *, resume: bool, overwrite: bool) -> None:
    """OUT is made if absent; a non-empty one is resumed, cleared of hqsam's files, or refused."""
    existing = check_out(out, resume=resume, overwrite=overwrite)
    if overwrite:
        for uri in existing:
            if _name(uri).startswith(OUR_PREFIXES) or _name(uri) in OUR_OUTPUTS:
                storage.remove(uri)
    storage.make_folder(out)


def check_out(out: str, *, resume: bool, overwrite: bool) -> list[str]:
    """OUT's entries, bar the run's bookkeeping; OutputNotEmptyError when there are any and neither
    --resume nor --overwrite was given. Creates nothing."""
    existing = [uri for uri in storage.list_folder(out) if not _name(uri).startswith(BOOKKEEPING)]
    if existing and not (resume or overwrite):
        raise OutputNotEmptyError(
            f"{storage.redact(out)} is not empty; pass --resume to continue the run in it or "
            "--overwrite to replace it"
        )
    return existing


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def not_yet_written(tasks: pa.Table, out: str) -> pa.Table:
    """The task rows without rows in OUT's part files yet. A part holds whole task rows, and a task
    row is known by its first annotation's position in the input (image ids can repeat, an image
    can be split into several rows)."""
    done = read_parts(out, ["ann_index"])["ann_index"].combine_chunks()
    first = pc.list_element(tasks["ann_indices"], 0)
    return tasks.filter(pc.invert(pc.is_in(first, value_set=done)))


def written_rows(tasks: pa.Table, out: str) -> tuple[pa.Table, int]:
    """OUT's rows (ann_index, status) of the annotations of `tasks`, one per annotation, and how
    many rows beyond that one OUT holds (none unless parts were copied in from elsewhere)."""
    rows = read_parts(out, ["ann_index", "status"])
    rows = rows.filter(pc.is_in(rows["ann_index"], value_set=pc.list_flatten(tasks["ann_indices"])))
    _, first = np.unique(rows["ann_index"].to_numpy(), return_index=True)
    return rows.take(first), rows.num_rows - len(first)


def account(
    config: RefineConfig, tasks: pa.Table, refined: pa.Table, elapsed: float, checkpoint: Path
) -> dict:
    """The run's summary: every annotation of `tasks` counted from what OUT holds; `refined` are the
    tasks this run refined, `checkpoint` the local file of the weights."""
    annotations_total = annotation_count(tasks)
    written, repeated = written_rows(tasks, config.out)
    images, images_refined = image_count(tasks), image_count(refined)
    counts = Counter(written["status"].to_pylist())
    failed = sum(n for status, n in counts.items() if status not in NOT_FAILURES)
    settings = config.settings
    return {
        "annotations_total": annotations_total,
        "annotations_written": written.num_rows,
        "annotations_ok": counts.get(Status.OK, 0),
        "errors": {status: n for status, n in sorted(counts.items()) if status != Status.OK},
        "error_rate": failed / annotations_total if annotations_total else 0.0,
        "max_error_rate": config.max_error_rate,
        "annotations_written_twice": repeated,
        "duplicate_annotation_ids": duplicate_annotation_ids(tasks),
        "images_total": images,
        "images_resumed": images - images_refined,
        "wall_time_s": round(elapsed, 3),
        "annotations_per_s": round(annotation_count(refined) / elapsed, 3) if elapsed else None,
        "images_per_s": round(images_refined / elapsed, 3) if elapsed else None,
        "model": settings.variant,
        "versions": versions(),
        "checkpoint": storage.redact(settings.checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "hq_head": storage.redact(settings.hq_head),
        "format": config.format,
        "out": storage.redact(config.out),
        "settings": dataclasses.asdict(settings)
        | {key: storage.redact(getattr(settings, key)) for key in URI_SETTINGS},
        "complete": written.num_rows == annotations_total and not repeated,
    }


def exit_code(summary: dict) -> int:
    """0 when every annotation was written and the failure share is within --max-error-rate."""
    return 0 if summary["complete"] and summary["error_rate"] <= summary["max_error_rate"] else 1


def summary_lines(summary: dict) -> list[str]:
    """The summary as aligned `label  value` lines for a terminal."""
    rows = [
        ("annotations", summary["annotations_total"]),
        ("refined ok", summary["annotations_ok"]),
        *((f"  {status}", n) for status, n in summary["errors"].items()),
        ("images", summary["images_total"]),
        ("images resumed", summary["images_resumed"]),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("throughput", f"{summary['annotations_per_s']} ann/s, {summary['images_per_s']} img/s"),
        ("error rate", f"{summary['error_rate']:.4f} (max {summary['max_error_rate']})"),
        *_integrity_lines(summary),
        ("summary", f"{summary['out'].rstrip('/')}/summary.json"),
    ]
    width = max(len(label) for label, _ in rows)
    return [f"{label:<{width}}  {value}" for label, value in rows]


def _integrity_lines(summary: dict) -> list[tuple[str, str]]:
    """Lines for repeated annotation ids in the input and for annotations written twice, if any."""
    lines = []
    duplicates = summary.get("duplicate_annotation_ids") or {}
    if duplicates.get("ids"):
        examples = ", ".join(map(str, duplicates["examples"]))
        lines.append(
            (
                "duplicate ids",
                f"{duplicates['ids']} annotation ids are shared by {duplicates['annotations']} "
                f"annotations (e.g. {examples}); each annotation was matched by its position",
            )
        )
    if summary.get("annotations_written_twice"):
        lines.append(
            ("written twice", f"{summary['annotations_written_twice']} annotations have more than one row")
        )
    return lines


@contextlib.contextmanager
def requested_resources(settings: RefineSettings) -> Iterator[None]:
    """On a cluster, ask the autoscaler up front for a node slot per refine actor (max of --actors):
    GPU nodes start while the first images are read, not after the actor pool finds it cannot grow.
    The request is cleared afterwards so that idle nodes can go. A no-op on a local Ray."""
    if not on_cluster():
        yield
        return
    from ray.autoscaler.sdk import request_resources

    bundle = {"GPU": 1} if settings.device.startswith("cuda") else {"CPU": 1}
    try:
        request_resources(bundles=[bundle] * settings.max_actors)
        log.info("requested %d x %s from the autoscaler", settings.max_actors, bundle)
    except Exception as error:  # a hint to the autoscaler: never worth failing the run for
        log.warning("could not request resources from the autoscaler: %s", error)
    try:
        yield
    finally:
        try:
            request_resources(bundles=[])
        except Exception as error:
            log.warning("could not clear the autoscaler resource request: %s", error)


def _consume(dataset, annotations: int, progress: bool) -> None:
    from tqdm import tqdm

    with tqdm(total=annotations, unit="ann", disable=not progress, desc="refining") as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            bar.update(sum(len(statuses) for statuses in batch["statuses"]))
