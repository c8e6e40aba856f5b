"""`hqsam refine`: parse, build the pipeline, run it, account for every annotation."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from hqsam_core.build import check_checkpoint
from hqsam_core.zoo import fetch_checkpoint, sha256_file
from pipeline import storage
from pipeline.manifest import read_manifest
from pipeline.refine_pipeline import RefineSettings, build_refine_dataset
from pipeline.write_coco import write_coco
from pipeline.write_parquet import PART_PREFIX, read_parts

log = logging.getLogger(__name__)

OUR_OUTPUTS = ("annotations.json", "summary.json")
NOT_FAILURES = ("ok", "crowd_skipped")  # crowd regions pass through on purpose


class OutputNotEmptyError(RuntimeError):
    """OUT already holds files and neither --resume nor --overwrite was given."""


@dataclass
class RefineConfig:
    annotations: str
    out: str
    images: str | None = None
    format: str = "parquet"
    settings: RefineSettings = field(
        default_factory=lambda: RefineSettings("vit_tiny", "sam_hq_vit_tiny", None, "cpu")
    )
    resume: bool = False
    overwrite: bool = False
    limit: int | None = None
    max_error_rate: float = 0.01


def run_refine(config: RefineConfig, *, progress: bool = True) -> dict:
    """Run the whole job; returns the summary (also written to OUT/summary.json)."""
    import ray

    started = time.time()
    config = _with_absolute_paths(config)
    settings = config.settings
    _prepare_out(config)
    checkpoint_path = fetch_checkpoint(settings.checkpoint)
    check_checkpoint(settings.variant, settings.checkpoint, settings.hq_head)  # before any actor starts

    manifest = read_manifest(config.annotations, config.images)
    tasks = manifest.tasks if config.limit is None else manifest.tasks.slice(0, config.limit)
    annotations_total = sum(len(ids) for ids in tasks["ann_ids"].to_pylist())
    done = pa.array(sorted(set(read_parts(config.out, ["image_id"])["image_id"].to_pylist())), pa.int64())
    remaining = tasks.filter(pc.invert(pc.is_in(tasks["image_id"], value_set=done)))
    images_resumed = tasks.num_rows - remaining.num_rows
    log.info("%d images to refine, %d already in %s", remaining.num_rows, images_resumed, config.out)

    refining = sum(len(ids) for ids in remaining["ann_ids"].to_pylist())
    if remaining.num_rows:
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with _requested_resources(settings):
            dataset = build_refine_dataset(remaining, config.out, settings)
            _consume(dataset, refining, progress)

    written = read_parts(config.out, ["image_id", "status"])
    counts = Counter(written["status"].to_pylist())
    if config.format == "coco":
        write_coco(config.annotations, config.out, only_processed_images=config.limit is not None)
    failed = sum(n for status, n in counts.items() if status not in NOT_FAILURES)
    elapsed = time.time() - started
    summary = {
        "annotations_total": annotations_total,
        "annotations_written": written.num_rows,
        "annotations_ok": counts.get("ok", 0),
        "errors": {status: n for status, n in sorted(counts.items()) if status != "ok"},
        "error_rate": failed / annotations_total if annotations_total else 0.0,
        "max_error_rate": config.max_error_rate,
        "images_total": tasks.num_rows,
        "images_resumed": images_resumed,
        "wall_time_s": round(elapsed, 3),
        "annotations_per_s": round(refining / elapsed, 3) if elapsed else None,
        "images_per_s": round(remaining.num_rows / elapsed, 3) if elapsed else None,
        "model": settings.variant,
        "checkpoint": settings.checkpoint,
        "checkpoint_sha256": sha256_file(checkpoint_path),
        "hq_head": settings.hq_head,
        "format": config.format,
        "out": config.out,
        "settings": asdict(settings),
    }
    summary["complete"] = written.num_rows == annotations_total
    storage.write_json(f"{config.out.rstrip('/')}/summary.json", summary)
    return summary


def exit_code(summary: dict) -> int:
    """0 when every annotation was written and the failure share is within --max-error-rate."""
    return 0 if summary["complete"] and summary["error_rate"] <= summary["max_error_rate"] else 1


def _with_absolute_paths(config: RefineConfig) -> RefineConfig:
    """Local paths made absolute: Ray workers need not share this process's working directory
    (in a Ray job they run in the job's working_dir)."""

    def absolute(uri: str | None, *, must_exist: bool = False) -> str | None:
        if not uri or storage.has_scheme(uri) or (must_exist and not os.path.exists(uri)):
            return uri  # a URI, or a zoo name such as sam_hq_vit_tiny
        return os.path.abspath(os.path.expanduser(uri))

    settings = dataclasses.replace(
        config.settings,
        checkpoint=absolute(config.settings.checkpoint, must_exist=True),
        hq_head=absolute(config.settings.hq_head, must_exist=True),
    )
    return dataclasses.replace(
        config,
        annotations=absolute(config.annotations),
        out=absolute(config.out),
        images=absolute(config.images),
        settings=settings,
    )


def on_cluster() -> bool:
    """Whether this driver is attached to a Ray cluster (a job, or RAY_ADDRESS), not a local Ray."""
    address = os.environ.get("RAY_ADDRESS", "")
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")) or address not in ("", "local")


@contextlib.contextmanager
def _requested_resources(settings: RefineSettings):
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


def _prepare_out(config: RefineConfig) -> None:
    fs, path = storage.url_to_fs(config.out)
    existing = fs.ls(path, detail=False) if fs.exists(path) else []
    if not existing:
        fs.makedirs(path, exist_ok=True)
        return
    if config.overwrite:
        for name in existing:
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith((PART_PREFIX, f".{PART_PREFIX}", ".annotations.json")) or base in OUR_OUTPUTS:
                fs.rm(name)
        return
    if not config.resume:
        raise OutputNotEmptyError(
            f"{config.out} is not empty; pass --resume to continue the run in it or --overwrite to replace it"
        )


def _consume(dataset, annotations: int, progress: bool) -> None:
    from tqdm import tqdm

    with tqdm(total=annotations, unit="ann", disable=not progress, desc="refining") as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            bar.update(sum(len(statuses) for statuses in batch["statuses"]))
