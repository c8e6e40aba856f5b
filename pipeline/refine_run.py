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

import pyarrow as pa
import pyarrow.compute as pc

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.build import check_checkpoint
from hqsam.hqsam_core.errors import HqsamError
from hqsam.hqsam_core.zoo import fetch_checkpoint, sha256_file
from hqsam.pipeline.cluster import init_ray, on_cluster
from hqsam.pipeline.manifest import annotation_count, read_manifest
from hqsam.pipeline.read_refined import PART_PREFIX, read_parts
from hqsam.pipeline.refine_pipeline import RefineSettings, build_refine_dataset
from hqsam.pipeline.write_coco import write_coco
from hqsam.schemas.status import NOT_FAILURES, Status

log = logging.getLogger(__name__)

OUR_OUTPUTS = ("annotations.json", "summary.json")
URI_SETTINGS = ("checkpoint", "hq_head")  # recorded redacted: a signed URL carries its secret
# What --overwrite removes besides OUR_OUTPUTS: part files and the temp files of killed writers.
OUR_PREFIXES = (PART_PREFIX, f".{PART_PREFIX}", ".annotations.json", ".summary.json")


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


def run_refine(config: RefineConfig, *, progress: bool = True) -> dict:
    """Run the whole job; returns the summary (also written to OUT/summary.json)."""
    started = time.time()
    config = with_absolute_paths(config)
    settings = config.settings
    prepare_out(config.out, resume=config.resume, overwrite=config.overwrite)
    checkpoint_path = fetch_checkpoint(settings.checkpoint)
    check_checkpoint(settings.variant, settings.checkpoint, settings.hq_head)  # before any actor starts

    tasks = read_manifest(config.annotations, config.images).tasks
    if config.limit is not None:
        tasks = tasks.slice(0, config.limit)
    remaining = not_yet_written(tasks, config.out)
    log.info(
        "%d images to refine, %d already in %s",
        remaining.num_rows,
        tasks.num_rows - remaining.num_rows,
        storage.redact(config.out),
    )
    if remaining.num_rows:
        init_ray()
        with requested_resources(settings):
            _consume(
                build_refine_dataset(remaining, config.out, settings), annotation_count(remaining), progress
            )
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
    """An empty OUT is made; a non-empty one is resumed, cleared of hqsam's files, or refused."""
    existing = storage.list_folder(out)
    if not existing:
        storage.make_folder(out)
    elif overwrite:
        for uri in existing:
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(OUR_PREFIXES) or name in OUR_OUTPUTS:
                storage.remove(uri)
    elif not resume:
        raise OutputNotEmptyError(
            f"{storage.redact(out)} is not empty; pass --resume to continue the run in it or "
            "--overwrite to replace it"
        )


def not_yet_written(tasks: pa.Table, out: str) -> pa.Table:
    """The task rows whose images have no rows in OUT's part files yet (a part holds whole images)."""
    done = pa.array(sorted(set(read_parts(out, ["image_id"])["image_id"].to_pylist())), pa.int64())
    return tasks.filter(pc.invert(pc.is_in(tasks["image_id"], value_set=done)))


def account(
    config: RefineConfig, tasks: pa.Table, refined: pa.Table, elapsed: float, checkpoint: Path
) -> dict:
    """The run's summary: every annotation of `tasks` counted from what OUT holds; `refined` are the
    tasks this run refined, `checkpoint` the local file of the weights."""
    annotations_total = annotation_count(tasks)
    written = read_parts(config.out, ["status"])
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
        "images_total": tasks.num_rows,
        "images_resumed": tasks.num_rows - refined.num_rows,
        "wall_time_s": round(elapsed, 3),
        "annotations_per_s": round(annotation_count(refined) / elapsed, 3) if elapsed else None,
        "images_per_s": round(refined.num_rows / elapsed, 3) if elapsed else None,
        "model": settings.variant,
        "checkpoint": storage.redact(settings.checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "hq_head": storage.redact(settings.hq_head),
        "format": config.format,
        "out": storage.redact(config.out),
        "settings": dataclasses.asdict(settings)
        | {key: storage.redact(getattr(settings, key)) for key in URI_SETTINGS},
        "complete": written.num_rows == annotations_total,
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
        ("summary", f"{summary['out'].rstrip('/')}/summary.json"),
    ]
    width = max(len(label) for label, _ in rows)
    return [f"{label:<{width}}  {value}" for label, value in rows]


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
