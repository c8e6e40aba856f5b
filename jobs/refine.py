"""`hqsam refine`: parse the options, run the refinement (pipeline/refine_run.py), print its summary."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

import typer

from hqsam.hqsam_core.acceptance import HELP as ACCEPTANCE_HELP
from hqsam.jobs.options import (
    ADDRESS_OPTION,
    CHECKPOINT_OPTION,
    CHECKPOINT_SHA256_OPTION,
    DETACH_OPTION,
    DEVICE_OPTION,
    FORWARD_ENV_OPTION,
    HQ_HEAD_OPTION,
    MODEL_OPTION,
    PROGRESS_OPTION,
    VERBOSE_OPTION,
    Device,
    Precision,
    Variant,
    checkpoint_or_default,
    device_or_default,
    fail,
)

if TYPE_CHECKING:
    from hqsam.pipeline.refine_run import RefineConfig


class OutputFormat(str, enum.Enum):
    parquet = "parquet"
    coco = "coco"


class Prompt(str, enum.Enum):
    box = "box"
    box_points = "box+points"
    box_mask = "box+mask"


class BoxSource(str, enum.Enum):
    bbox = "bbox"
    segmentation = "segmentation"


ANNOTATIONS_HELP = (
    "COCO instances JSON, a Parquet manifest (schemas/manifest.py), or a task folder of hqsam manifest; "
    "local or on object storage. Streamed into task rows (OUT/_hqsam_tasks/, reused by --resume): "
    "memory grows with images, not annotations."
)
IMAGES_HELP = "Root that file_name / image_uri are relative to (default: the annotation file's folder)."
FORMAT_HELP = "parquet: OUT/rows/part-*.parquet; coco: also OUT/annotations.json."
BOX_SOURCE_HELP = "Prompt with the annotation's bbox, or with the tight box of its segmentation."
CROP_ZOOM_HELP = (
    "Refine boxes whose long side is under this share of the image's on a zoomed crop (e.g. 0.25)."
)
PROMPT_HELP = (
    "box: the box alone. box+points: then --prompt-rounds rounds of up to --prompt-points points "
    "where the mask and the original disagree (positive where only the original covers), "
    "--prompt-trials draws averaged; seeded per annotation, so reruns give the same masks. "
    "box+mask: the box with the original mask as SAM's mask prompt. An annotation without a "
    "readable mask gets its box alone (its row's prompt says so)."
)
MIN_REGION_AREA_HELP = (
    "Remove islands and fill holes under N pixels in every refined mask (as SAM's automatic mask "
    "generator does); every output and quality column sees the cleaned mask."
)
MAX_PROMPTS_HELP = "Boxes per decoder call: bounds decoder memory (default: 64 on CUDA, 16 on CPU)."
ACTORS_HELP = "Refine actors MIN[:MAX]; with MAX > MIN an autoscaler may add GPU nodes."

IMAGES_OPTION = typer.Option(None, "--images", help=IMAGES_HELP)
OUT_OPTION = typer.Option(..., "--out", help="Output folder or URI (local, s3://, gs://).")
FORMAT_OPTION = typer.Option(OutputFormat.parquet, "--format", help=FORMAT_HELP)
BATCH_SIZE_OPTION = typer.Option(
    4, "--batch-size", min=1, max=64, help="Images per refine call (with all their boxes)."
)
ACTORS_OPTION = typer.Option("1", "--actors", help=ACTORS_HELP)
HQ_TOKEN_ONLY_OPTION = typer.Option(False, "--hq-token-only/--no-hq-token-only", help="HQ logits alone.")
BOX_SOURCE_OPTION = typer.Option(BoxSource.bbox, "--box-source", help=BOX_SOURCE_HELP)
PRECISION_OPTION = typer.Option(None, "--precision", help="Default: bf16 on CUDA, fp32 on CPU.")
COMPILE_OPTION = typer.Option(
    False, "--compile", help="torch.compile the decoder; the first batch pays for it."
)
CROP_ZOOM_OPTION = typer.Option(None, "--crop-zoom", min=0.0, max=1.0, help=CROP_ZOOM_HELP)
PROMPT_OPTION = typer.Option(Prompt.box, "--prompt", help=PROMPT_HELP)
PROMPT_ROUNDS_OPTION = typer.Option(1, "--prompt-rounds", min=1, max=10, help="box+points: rounds (K).")
PROMPT_POINTS_OPTION = typer.Option(
    2, "--prompt-points", min=1, max=32, help="box+points: points per round (P)."
)
PROMPT_TRIALS_OPTION = typer.Option(
    3, "--prompt-trials", min=1, max=16, help="box+points: draws averaged (T)."
)
MIN_REGION_AREA_OPTION = typer.Option(0, "--min-region-area", min=0, metavar="N", help=MIN_REGION_AREA_HELP)
ACCEPT_OPTION = typer.Option(None, "--accept", metavar="EXPR", help=ACCEPTANCE_HELP)
MAX_PROMPTS_OPTION = typer.Option(None, "--max-prompts", min=1, help=MAX_PROMPTS_HELP)
THREADS_OPTION = typer.Option(None, "--threads", min=1, help="Torch threads per actor on CPU.")
IMAGES_PER_FILE_OPTION = typer.Option(
    512, "--images-per-file", min=1, hidden=True, help="Images per part file."
)
RESUME_OPTION = typer.Option(False, "--resume", help="Continue a run: skip images already written to OUT.")
OVERWRITE_OPTION = typer.Option(False, "--overwrite", help="Delete hqsam's files in OUT and start over.")
LIMIT_OPTION = typer.Option(None, "--limit", min=1, help="Refine only the first N images.")
GPU_WAIT_OPTION = typer.Option(
    900.0,
    "--gpu-wait-s",
    min=0.0,
    help="With --device cuda on an autoscaling cluster: seconds to wait for a GPU node.",
)
RANDOM_WEIGHTS_WARNING = (
    "hqsam: warning: --checkpoint random: the model has random weights, so its masks are meaningless "
    "(a dry run)"
)
MAX_ERROR_RATE_OPTION = typer.Option(
    0.01, "--max-error-rate", min=0.0, max=1.0, help="Exit 1 when more than this share of annotations failed."
)


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
    ctx: typer.Context,
    annotations: str = typer.Argument(
        ...,
        help=ANNOTATIONS_HELP,
    ),
    images: str | None = IMAGES_OPTION,
    out: str = OUT_OPTION,
    format: OutputFormat = FORMAT_OPTION,
    model: Variant = MODEL_OPTION,
    checkpoint: str | None = CHECKPOINT_OPTION,
    hq_head: str | None = HQ_HEAD_OPTION,
    checkpoint_sha256: str | None = CHECKPOINT_SHA256_OPTION,
    device: Device | None = DEVICE_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    actors: str = ACTORS_OPTION,
    hq_token_only: bool = HQ_TOKEN_ONLY_OPTION,
    box_source: BoxSource = BOX_SOURCE_OPTION,
    precision: Precision | None = PRECISION_OPTION,
    compile: bool = COMPILE_OPTION,
    crop_zoom: float | None = CROP_ZOOM_OPTION,
    prompt: Prompt = PROMPT_OPTION,
    prompt_rounds: int = PROMPT_ROUNDS_OPTION,
    prompt_points: int = PROMPT_POINTS_OPTION,
    prompt_trials: int = PROMPT_TRIALS_OPTION,
    min_region_area: int = MIN_REGION_AREA_OPTION,
    accept: str | None = ACCEPT_OPTION,
    max_prompts: int | None = MAX_PROMPTS_OPTION,
    threads: int | None = THREADS_OPTION,
    images_per_file: int = IMAGES_PER_FILE_OPTION,
    resume: bool = RESUME_OPTION,
    overwrite: bool = OVERWRITE_OPTION,
    limit: int | None = LIMIT_OPTION,
    max_error_rate: float = MAX_ERROR_RATE_OPTION,
    gpu_wait_s: float = GPU_WAIT_OPTION,
    progress: bool = PROGRESS_OPTION,
    verbose: bool = VERBOSE_OPTION,
    address: str | None = ADDRESS_OPTION,
    detach: bool = DETACH_OPTION,
    forward_env: list[str] = FORWARD_ENV_OPTION,
) -> None:
    """Refine every annotation of a dataset with HQ-SAM; one output row per input annotation.

    Every annotation ends as exactly one row with a status: ok, image_missing, image_unreadable,
    image_size_mismatch, invalid_box, crowd_skipped or inference_failed. A summary is printed and
    written to OUT/summary.json. Each ok row is rated (stability, sam_hq_iou, change against the
    original) and judged by the --accept policy: --format coco takes the refined mask only where it is
    accepted; `hqsam review` and `hqsam apply` let a person decide the rest.

    A dry run without the official weights: --checkpoint random (random weights of one fixed seed).
    Their masks are MEANINGLESS; every row's model says so (vit_tiny:random, not
    vit_tiny:sha256=<12 hex>), and --format coco takes --overwrite.
    """
    options = dict(locals())  # the parsed options by name, for refine_config
    from hqsam.pipeline.refine_run import run_refine
    from hqsam.pipeline.refine_summary import exit_code
    from hqsam.pipeline.submission import submit_if_requested

    check_options(options)
    submit_if_requested(ctx, address, detach, forward_env)
    config = refine_config(options)
    warn_if_random_weights(checkpoint)
    summary = run_refine(config, progress=progress)
    report(summary)
    raise typer.Exit(exit_code(summary))


def check_options(options: dict[str, Any]) -> None:
    """Exit 2 on options that cannot work together, before anything runs or a job is submitted."""
    from hqsam.pipeline.refine_run import refuse_meaningless_coco

    crop_zoom, prompt = options["crop_zoom"], options["prompt"]
    if crop_zoom is not None and not 0 < crop_zoom <= 1:
        fail(f"--crop-zoom {crop_zoom} is outside (0, 1]: give the share of the image's long side, e.g. 0.25")
    if crop_zoom is not None and prompt != Prompt.box:
        fail(f"--crop-zoom refines box prompts only; --prompt {prompt.value} refines on the whole image")
    parse_policy(options["accept"])
    refuse_meaningless_coco(options["checkpoint"], options["format"].value, options["overwrite"])


def parse_policy(text: str | None):
    """The --accept policy (the default when none is given); exit 2 naming the bad token."""
    from hqsam.hqsam_core.acceptance import DEFAULT_POLICY, AcceptancePolicy, PolicyError

    try:
        return AcceptancePolicy.parse(DEFAULT_POLICY if text is None else text)
    except PolicyError as error:
        fail(str(error))


def warn_if_random_weights(checkpoint: str | None) -> None:
    """One line before a dry run: the masks of random weights are meaningless."""
    from hqsam.hqsam_core.random_weights import is_random_weights

    if is_random_weights(checkpoint):
        typer.secho(RANDOM_WEIGHTS_WARNING, err=True, fg=typer.colors.YELLOW)


def refine_config(options: dict[str, Any]) -> RefineConfig:
    """The run's RefineConfig from `refine`'s parsed options."""
    from hqsam.pipeline.refine_pipeline import RefineSettings
    from hqsam.pipeline.refine_run import RefineConfig

    if options["resume"] and options["overwrite"]:
        fail("--resume and --overwrite exclude each other")
    min_actors, max_actors = parse_actors(options["actors"])
    model, precision = options["model"], options["precision"]
    settings = RefineSettings(
        variant=model.value,
        checkpoint=checkpoint_or_default(options["checkpoint"], model, options["checkpoint_sha256"]),
        hq_head=options["hq_head"],
        device=device_or_default(options["device"]),
        batch_size=options["batch_size"],
        min_actors=min_actors,
        max_actors=max_actors,
        hq_token_only=options["hq_token_only"],
        box_source=options["box_source"].value,
        max_prompts=options["max_prompts"],
        torch_threads=options["threads"],
        precision=precision and precision.value,
        compile=options["compile"],
        crop_zoom=options["crop_zoom"],
        prompt=options["prompt"].value,
        prompt_rounds=options["prompt_rounds"],
        prompt_points=options["prompt_points"],
        prompt_trials=options["prompt_trials"],
        min_region_area=options["min_region_area"],
        accept=parse_policy(options["accept"]).text,
        images_per_file=options["images_per_file"],
    )
    return RefineConfig(
        annotations=options["annotations"],
        out=options["out"],
        images=options["images"],
        format=options["format"].value,
        settings=settings,
        resume=options["resume"],
        overwrite=options["overwrite"],
        limit=options["limit"],
        max_error_rate=options["max_error_rate"],
        gpu_wait_s=options["gpu_wait_s"],
    )


def report(summary: dict) -> None:
    """The summary's lines, and a red line when annotations have no output row."""
    from hqsam.pipeline.refine_summary import summary_lines

    for line in summary_lines(summary):
        typer.echo(line)
    missing = summary["annotations_total"] - summary["annotations_written"]
    if missing > 0:  # more rows than annotations leaves none missing: never print a count below 0
        typer.secho(f"{missing} annotations have no output row", err=True, fg=typer.colors.RED)
