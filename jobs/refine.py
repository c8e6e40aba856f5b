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

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.build import check_checkpoint
from hqsam.hqsam_core.errors import HqsamError
from hqsam.hqsam_core.zoo import fetch_checkpoint, sha256_file
from hqsam.pipeline.manifest import read_manifest
from hqsam.pipeline.read_refined import PART_PREFIX, read_parts
from hqsam.pipeline.refine_pipeline import RefineSettings, build_refine_dataset
from hqsam.pipeline.write_coco import write_coco

log = logging.getLogger(__name__)

OUR_OUTPUTS = ("annotations.json", "summary.json")
NOT_FAILURES = ("ok", "crowd_skipped")  # crowd regions pass through on purpose


class OutputNotEmptyError(HqsamError, RuntimeError):
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


# --- the `hqsam refine` command ------------------------------------------------------------------
# (moved from jobs/cli.py; its options use the shared declarations in jobs/options.py)

import typer  # noqa: E402

from hqsam.hqsam_core.variants import VARIANTS  # noqa: E402
from hqsam.jobs.options import ADDRESS_OPTION, DETACH_OPTION, FORWARD_ENV_OPTION, fail  # noqa: E402
from hqsam.jobs.submit import submit_if_requested  # noqa: E402,F401

MODEL_HELP = f"Model variant: {', '.join(VARIANTS)}."
CHECKPOINT_HELP = (
    "Weights: a path, an fsspec URI (s3://, gs://, https://) or a zoo name such as sam_hq_vit_tiny. "
    "Default: the official HQ-SAM file of --model, downloaded once into $HQSAM_CACHE."
)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_actors(text: str) -> tuple[int, int]:
    """'2' -> (2, 2); '1:8' -> (1, 8)."""
    try:
        low, _, high = text.partition(":")
        bounds = int(low), int(high or low)
    except ValueError:
        fail(f"--actors {text!r} is not MIN or MIN:MAX")
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        fail(f"--actors {text!r} needs 1 <= MIN <= MAX (Ray actor pools cannot scale to zero)")
    return bounds


def refine(
    annotations: str = typer.Argument(
        ...,
        help="COCO instances JSON, or a Parquet manifest (schemas/manifest.py), local or on object storage.",
    ),
    images: str | None = typer.Option(
        None,
        "--images",
        help="Root that file_name / image_uri are relative to (default: the annotation file's folder).",
    ),
    out: str = typer.Option(..., "--out", help="Output folder or URI (local, s3://, gs://)."),
    format: str = typer.Option(
        "parquet", "--format", help="parquet: OUT/part-*.parquet; coco: those plus OUT/annotations.json."
    ),
    model: str = typer.Option("vit_tiny", "--model", help=MODEL_HELP),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    hq_head: str | None = typer.Option(
        None, "--hq-head", help="HQ head file to combine with a plain SAM checkpoint."
    ),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)."),
    batch_size: int = typer.Option(
        4, "--batch-size", min=1, help="Images per refine call (all their boxes go along)."
    ),
    actors: str = typer.Option(
        "1",
        "--actors",
        help="Refiner actors MIN[:MAX]; with MAX > MIN a cluster autoscaler may add GPU nodes.",
    ),
    hq_token_only: bool = typer.Option(
        False, "--hq-token-only/--no-hq-token-only", help="HQ logits alone, not SAM+HQ."
    ),
    box_source: str = typer.Option(
        "bbox",
        "--box-source",
        help="Prompt from the COCO bbox, or from the tight box of the existing segmentation.",
    ),
    precision: str | None = typer.Option(
        None, "--precision", help="fp32, bf16 or fp16 for the model (default: bf16 on CUDA, fp32 on CPU)."
    ),
    compile: bool = typer.Option(
        False, "--compile", help="torch.compile the decoder; the first batch pays for it."
    ),
    crop_zoom: float | None = typer.Option(
        None,
        "--crop-zoom",
        min=0.0,
        max=1.0,
        help="Refine boxes whose long side is under this share of the image's on a zoomed crop (e.g. 0.25).",
    ),
    max_prompts: int | None = typer.Option(
        None,
        "--max-prompts",
        min=1,
        help="Boxes per decoder call: bounds decoder memory (default: 64 on CUDA, 16 on CPU).",
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Torch threads per actor on CPU."),
    images_per_file: int = typer.Option(
        512, "--images-per-file", min=1, hidden=True, help="Images per Parquet part file."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue a run: skip images already written to OUT."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete hqsam's files in OUT and start over."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Refine only the first N images."),
    max_error_rate: float = typer.Option(
        0.01,
        "--max-error-rate",
        min=0.0,
        max=1.0,
        help="Exit 1 when more than this share of annotations failed.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    address: str | None = ADDRESS_OPTION,
    detach: bool = DETACH_OPTION,
    forward_env: list[str] = FORWARD_ENV_OPTION,
) -> None:
    """Refine every annotation of a dataset with box-prompted HQ-SAM; one output row per input annotation.

    Every annotation ends as exactly one row with a status: ok, image_missing, image_unreadable,
    image_size_mismatch, invalid_box, crowd_skipped or inference_failed. A summary is printed and
    written to OUT/summary.json.
    """
    submit_if_requested(address, detach, forward_env)
    from hqsam.hqsam_core import CheckpointError
    from hqsam.hqsam_core.zoo import CheckpointSourceError
    from hqsam.jobs.refine import OutputNotEmptyError, RefineConfig, exit_code, run_refine
    from hqsam.pipeline.manifest import ManifestError
    from hqsam.pipeline.refine_pipeline import RefineSettings

    if model not in VARIANTS:
        fail(f"unknown --model {model!r}; choose one of {', '.join(VARIANTS)}")
    if format not in ("parquet", "coco"):
        fail(f"--format must be parquet or coco, not {format!r}")
    if box_source not in ("bbox", "segmentation"):
        fail(f"--box-source must be bbox or segmentation, not {box_source!r}")
    if precision not in (None, "fp32", "bf16", "fp16"):
        fail(f"--precision must be fp32, bf16 or fp16, not {precision!r}")
    if resume and overwrite:
        fail("--resume and --overwrite exclude each other")
    min_actors, max_actors = parse_actors(actors)
    settings = RefineSettings(
        variant=model,
        checkpoint=checkpoint or f"sam_hq_{model}",
        hq_head=hq_head,
        device=device or default_device(),
        batch_size=batch_size,
        min_actors=min_actors,
        max_actors=max_actors,
        hq_token_only=hq_token_only,
        box_source=box_source,
        max_prompts=max_prompts,
        torch_threads=threads,
        precision=precision,
        compile=compile,
        crop_zoom=crop_zoom,
        images_per_file=images_per_file,
    )
    config = RefineConfig(
        annotations=annotations,
        out=out,
        images=images,
        format=format,
        settings=settings,
        resume=resume,
        overwrite=overwrite,
        limit=limit,
        max_error_rate=max_error_rate,
    )
    try:
        summary = run_refine(config, progress=progress)
    except (CheckpointError, CheckpointSourceError, ManifestError, OutputNotEmptyError) as error:
        fail(str(error))
    print_summary(summary)
    raise typer.Exit(exit_code(summary))


def print_summary(summary: dict) -> None:
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
    for label, value in rows:
        typer.echo(f"{label:<{width}}  {value}")
    if not summary["complete"]:
        typer.secho(
            f"{summary['annotations_total'] - summary['annotations_written']} annotations have no output row",
            err=True,
            fg=typer.colors.RED,
        )
