"""One `hqsam refine` run: OUT policy, resume, the Ray run of the chain, and the accounting of every
annotation (OUT/summary.json, the exit code)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.build import check_checkpoint
from hqsam.hqsam_core.errors import HqsamError
from hqsam.hqsam_core.random_weights import is_random_weights
from hqsam.hqsam_core.zoo import fetch_checkpoint
from hqsam.pipeline.cluster import GPU_WAIT_S, init_ray, on_cluster, wait_for_gpus
from hqsam.pipeline.out_folder import check_out, prepare_out
from hqsam.pipeline.out_lease import STALE_AFTER_S, out_lease, refuse_if_leased
from hqsam.pipeline.out_tally import OutTally, tally_out
from hqsam.pipeline.read_refined import part_files
from hqsam.pipeline.refine_pipeline import RefineSettings, build_refine_dataset
from hqsam.pipeline.refine_summary import account
from hqsam.pipeline.run_identity import check_same_job, record_identity, run_identity, weights_label
from hqsam.pipeline.stream_coco import StreamedManifest
from hqsam.pipeline.task_source import check_input, discard_published, publish, read_tasks, task_dataset
from hqsam.pipeline.write_coco import write_coco
from hqsam.pipeline.write_leftovers import write_leftovers

log = logging.getLogger(__name__)


class RefineRefusedError(HqsamError):
    """A refine job asked for something it must not do (e.g. COCO output from a Parquet manifest)."""


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
    with tempfile.TemporaryDirectory(prefix="hqsam-tasks-") as staging:
        tasks, identity = check_job(config, staging, progress)
        # Computed once, from the hash of the identity: every row's `model` traces the weights.
        config = dataclasses.replace(
            config, settings=dataclasses.replace(config.settings, model_label=weights_label(identity))
        )
        with out_lease(config.out, stale_after_s=config.lease_timeout_s):
            claim_out(config, identity)
            tasks = publish(tasks, staging, config.out)
            return refine_into_out(config, tasks, identity, started, progress)


def check_job(config: RefineConfig, staging: str, progress: bool = False) -> tuple[StreamedManifest, dict]:
    """What can fail before OUT is touched, cheapest first: the output format, another run in OUT,
    the OUT policy, the weights, on --resume that OUT holds this same job, the annotation file (read
    as a stream into a task folder in `staging`, pipeline/task_source.py) and the GPUs --device cuda
    needs. Returns the task folder and the run's identity (pipeline/run_identity.py)."""
    settings = config.settings
    refuse_meaningless_coco(settings.checkpoint, config.format, config.overwrite)
    refuse_if_leased(config.out)
    check_out(config.out, resume=config.resume, overwrite=config.overwrite)
    if config.format == "coco" and not is_coco_file(config.annotations):
        raise RefineRefusedError(
            f"--format coco writes the input COCO file with refined masks, and "
            f"{storage.redact(config.annotations)} is a Parquet manifest or task folder; use --format parquet"
        )
    check_input(config.annotations)
    random = is_random_weights(settings.checkpoint)
    checkpoint_path = None if random else fetch_checkpoint(settings.checkpoint)
    check_checkpoint(settings.variant, settings.checkpoint, settings.hq_head)  # before any actor starts
    identity = run_identity(config.annotations, config.images, settings, checkpoint_path)
    if config.resume:
        check_same_job(config.out, identity)
    reuse_from = config.out if config.resume else None
    tasks = read_tasks(
        config.annotations, config.images, config.limit, staging, reuse_from=reuse_from, progress=progress
    )
    check_gpus(settings, config.gpu_wait_s)
    return tasks, identity


def refuse_meaningless_coco(checkpoint: str, format: str, overwrite: bool) -> None:
    """Random weights make meaningless masks: written as COCO annotations they could pass for real
    ones, so that takes --overwrite."""
    if is_random_weights(checkpoint) and format == "coco" and not overwrite:
        raise RefineRefusedError(
            "--checkpoint random makes meaningless masks, and --format coco would write them as "
            "annotations; use --format parquet for a dry run, or add --overwrite to write them anyway"
        )


def is_coco_file(uri: str) -> bool:
    """Whether `uri` is a file that does not start as a Parquet file does (a task folder is no
    file); True when there is no file (the manifest reader says so)."""
    fs, path = storage.url_to_fs(uri)
    try:
        return fs.cat_file(path, start=0, end=4) != b"PAR1"
    except FileNotFoundError:
        return True
    except IsADirectoryError:
        return False


def check_gpus(settings: RefineSettings, timeout_s: float) -> None:
    """With --device cuda, NoGpuError unless the Ray cluster has a GPU (on an autoscaling cluster,
    once one has joined within `timeout_s`, asked for as refine_into_out asks for it again): checked
    before OUT is touched, it leaves nothing behind. Starts Ray for CUDA devices only."""
    if not settings.device.startswith("cuda"):
        return
    init_ray()
    with requested_resources(settings):
        wait_for_gpus(settings.device, timeout_s)


def claim_out(config: RefineConfig, identity: dict) -> None:
    """Under OUT's lease: OUT checked again (another run may have written it since the first check),
    made or cleared, and the run's identity recorded in it."""
    prepare_out(config.out, resume=config.resume, overwrite=config.overwrite)
    if config.resume:
        check_same_job(config.out, identity)
    record_identity(config.out, identity, resume=config.resume)


def refine_into_out(
    config: RefineConfig, tasks: StreamedManifest, identity: dict, started: float, progress: bool
) -> dict:
    """Refine the task rows OUT has no rows of yet, write the COCO file if asked, and account for
    every annotation of `tasks`, counted by Ray workers (pipeline/out_tally.py)."""
    settings = config.settings
    init_ray()
    before, written = OutTally.nothing_written(tasks), None
    if config.resume and part_files(config.out):
        before, written = tally_out(tasks, config.out)
    log.info(
        "%d images to refine, %d already in %s",
        before.unwritten_images,
        tasks.images - before.unwritten_images,
        storage.redact(config.out),
    )
    if before.unwritten_rows:
        with requested_resources(settings):
            crash = run_chain(tasks, written, config, before.unwritten_annotations, progress)
            write_leftovers(tasks, config.out, settings, crash)
    if config.format == "coco":
        write_coco(config.annotations, config.out, only_processed_images=config.limit is not None)
    after, _ = tally_out(tasks, config.out)
    summary = account(config, tasks, before, after, time.time() - started, identity["checkpoint_sha256"])
    storage.write_json(storage.join(config.out, "summary.json"), summary)
    if summary["complete"]:
        discard_published(config.out)
    return summary


def run_chain(
    tasks: StreamedManifest, written, config: RefineConfig, annotations: int, progress: bool
) -> Exception | None:
    """Run the chain over the task rows not marked in `written`; the error it ended with, if any
    (a failed run still ends with one row per annotation: write_leftovers). Nothing of the run's
    dataset outlives this call, not even through the error's traceback: its actor pool holds the
    refine actors' CPUs and GPUs, which the leftovers' pass needs."""
    try:
        dataset = build_refine_dataset(task_dataset(tasks, written), config.out, config.settings)
        _consume(dataset, annotations, progress)
    except Exception as error:
        return error.with_traceback(None)
    finally:
        dataset = None
        gc.collect()
    return None


def with_absolute_paths(config: RefineConfig) -> RefineConfig:
    """Local paths made absolute: Ray workers need not share this process's working directory
    (in a Ray job they run in the job's working_dir). A checkpoint that is no local file stays as
    it is: a URI, or a zoo name such as sam_hq_vit_tiny."""

    def if_local_file(uri: str | None) -> str | None:
        local = uri and os.path.exists(uri) and not is_random_weights(uri)  # "random" names no file
        return storage.absolute(uri) if local else uri

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
    """Run the dataset to its end; progress in rows (annotations) written, images per second and
    failed rows so far (pipeline/progress.py)."""
    from hqsam.pipeline.progress import ProgressReporter
    from hqsam.schemas.status import NOT_FAILURES

    reporter = ProgressReporter(
        "refine", annotations, unit="rows", rate_unit="img/s", counters=("failed",), enabled=progress
    )
    with reporter:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            statuses = [str(status) for image in batch["statuses"] for status in image]
            failed = sum(status not in NOT_FAILURES for status in statuses)
            reporter.advance(len(statuses), work=len(batch["statuses"]), failed=failed)
