"""One `hqsam refine` run: OUT policy, resume, the Ray run of the chain, and the accounting of every
annotation (OUT/summary.json, the exit code)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.build import check_checkpoint
from hqsam.hqsam_core.zoo import fetch_checkpoint
from hqsam.pipeline.cluster import GPU_WAIT_S, init_ray, on_cluster, wait_for_gpus
from hqsam.pipeline.manifest import (
    annotation_count,
    first_images,
    image_count,
    read_manifest,
)
from hqsam.pipeline.out_folder import check_out, prepare_out
from hqsam.pipeline.out_lease import STALE_AFTER_S, out_lease, refuse_if_leased
from hqsam.pipeline.read_refined import not_yet_written
from hqsam.pipeline.refine_pipeline import RefineSettings, build_refine_dataset
from hqsam.pipeline.refine_summary import account
from hqsam.pipeline.run_identity import check_same_job, record_identity, run_identity
from hqsam.pipeline.write_coco import write_coco
from hqsam.pipeline.write_leftovers import write_leftovers

log = logging.getLogger(__name__)


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
