"""The `hqsam` command line."""

from __future__ import annotations

from pathlib import Path

import typer

from hqsam_core.variants import VARIANTS
from jobs.submit import ADDRESS_OPTION, DETACH_OPTION, FORWARD_ENV_OPTION, jobs_app, submit_if_requested

app = typer.Typer(
    help="Refine segmentation masks of whole datasets with HQ-SAM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(jobs_app, name="jobs")

MODEL_HELP = f"Model variant: {', '.join(VARIANTS)}."
CHECKPOINT_HELP = (
    "Weights: a path, an fsspec URI (s3://, gs://, https://) or a zoo name such as sam_hq_vit_tiny. "
    "Default: the official HQ-SAM file of --model, downloaded once into $HQSAM_CACHE."
)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


@app.callback()
def main() -> None:
    # A callback keeps `hqsam` a command group: without it Typer collapses a one-command app
    # into that command, so `hqsam predict IMAGE` would read "predict" as the image.
    pass


@app.command()
def predict(
    image: str = typer.Argument(
        ..., help="Image file or URI (PNG, JPEG, ...; gray, RGBA and 16-bit are converted)."
    ),
    box: list[str] = typer.Option(
        ..., "--box", help="Box prompt x0,y0,x1,y1 in pixels; repeat for more boxes."
    ),
    model: str = typer.Option("vit_tiny", "--model", help=MODEL_HELP),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    hq_head: str | None = typer.Option(
        None, "--hq-head", help="HQ head file to combine with a plain SAM checkpoint."
    ),
    allow_random_hq_head: bool = typer.Option(
        False,
        "--allow-random-hq-head",
        help="Accept a plain SAM checkpoint and keep the HQ head random (tests only).",
    ),
    out: Path = typer.Option(Path("predictions"), "--out", help="Folder for the mask PNGs and the overlay."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)."),
    hq_token_only: bool = typer.Option(
        False, "--hq-token-only/--no-hq-token-only", help="HQ logits alone, not SAM+HQ."
    ),
    multimask: bool = typer.Option(
        False, "--multimask", help="Take SAM's best of three masks as the SAM part."
    ),
) -> None:
    """Refine boxes on one image: writes IMAGE_maskK.png per box and IMAGE_overlay.png."""
    from hqsam_core import CheckpointError
    from hqsam_core.zoo import CheckpointSourceError
    from jobs.predict import InputError, parse_box, run_predict

    if model not in VARIANTS:
        fail(f"unknown --model {model!r}; choose one of {', '.join(VARIANTS)}")
    try:
        boxes = [parse_box(text) for text in box]
        records = run_predict(
            image,
            boxes,
            out,
            variant=model,
            checkpoint=checkpoint or f"sam_hq_{model}",
            hq_head=hq_head,
            allow_random_hq_head=allow_random_hq_head,
            device=device or default_device(),
            hq_token_only=hq_token_only,
            multimask_output=multimask,
        )
    except (InputError, CheckpointError, CheckpointSourceError) as error:
        fail(str(error))
    for k, record in enumerate(records):
        x0, y0, x1, y1 = record["box"]
        typer.echo(
            f"box {k} [{x0:g},{y0:g},{x1:g},{y1:g}]: score {record['score']:.3f}, "
            f"area {record['area']} px -> {record['mask']}"
        )
    typer.echo(f"overlay -> {out / (Path(image).stem + '_overlay.png')}")


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


@app.command()
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
    from hqsam_core import CheckpointError
    from hqsam_core.zoo import CheckpointSourceError
    from jobs.refine import OutputNotEmptyError, RefineConfig, exit_code, run_refine
    from pipeline.manifest import ManifestError
    from pipeline.refine_pipeline import RefineSettings

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


@app.command()
def preview(
    out: str = typer.Argument(..., help="The --out of `hqsam refine` (local, s3://, gs://)."),
    to: str = typer.Option(..., "--to", help="Folder for panel_<annotation_id>.png and index.html."),
    images: str | None = typer.Option(
        None,
        "--images",
        help="Root the images moved to. With --annotations: ROOT/file_name, as `refine --images ROOT`. "
        "Without: ROOT joined with the last 4, 3, 2 or 1 path parts of the run's image_uri, the first "
        "that exists. Default: the image_uri the run read.",
    ),
    annotations: str | None = typer.Option(
        None,
        "--annotations",
        help="The run's input (COCO JSON or Parquet manifest), for the original masks and boxes; "
        "without it the panels show the refined outline only.",
    ),
    n: int = typer.Option(24, "--n", min=1, help="Number of panels."),
    worst: bool = typer.Option(
        False,
        "--worst",
        help="Show the N largest changes (lowest iou_vs_original) instead of a spread over the whole range.",
    ),
) -> None:
    """Render PNG panels of image, original (orange) and refined (cyan) outline, and an index.html grid.

    Only ok rows are shown, sorted by iou_vs_original ascending (largest change first); rows without
    an original mask come last. An image that cannot be read is skipped with a note in index.html.
    """
    from jobs.preview import PreviewError, run_preview

    try:
        result = run_preview(out, to, images=images, annotations=annotations, n=n, worst=worst)
    except PreviewError as error:
        fail(str(error))
    typer.echo(f"{len(result.written)} panels, {len(result.skipped)} skipped -> {result.index}")


DATA_HELP = (
    "Data source; repeat to merge several. An image+gt folder pair SRC (SRC/im/*.jpg|png, SRC/gt/*.png by "
    "stem), a COCO instances JSON, or the OUT of `hqsam refine` (status ok rows); local or s3://, gs://. "
    "Options after '::': weight=W (sample it W times per epoch), images=ROOT (COCO image root), "
    "original=URI (the original annotation to score too: PNG folder or COCO file with the same ids)."
)


@app.command()
def train(
    data: list[str] = typer.Option(..., "--data", help=DATA_HELP),
    out: str = typer.Option(
        ..., "--out", help="Run folder (local or s3://): checkpoints, hq_head.pth, model.pth, metrics.json."
    ),
    model: str = typer.Option("vit_tiny", "--model", help=MODEL_HELP),
    checkpoint: str | None = typer.Option(
        None,
        "--checkpoint",
        help="BASE weights: SAM or HQ-SAM (path, URI or zoo name); SAM stays frozen and is exported "
        "bit-identical. A plain SAM file starts a fresh HQ head. Default: sam_hq_<model>.",
    ),
    hq_head: str | None = typer.Option(
        None, "--hq-head", help="Start the HQ head from this file instead of BASE's."
    ),
    val: list[str] = typer.Option([], "--val", help="Validation source (same forms as --data); repeatable."),
    workers: int = typer.Option(1, "--workers", min=1, help="Ray Train workers (one GPU each with cuda)."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Samples per worker per step."),
    epochs: int = typer.Option(12, "--epochs", min=1, help="Epochs over the merged data."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Adam learning rate (no weight decay)."),
    lr_drop_epoch: int = typer.Option(
        10, "--lr-drop-epoch", min=1, help="Multiply the lr by 0.1 every N epochs."
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, help="Stop after N steps in all (smoke runs)."
    ),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", min=1, help="Also checkpoint every K steps (every epoch's end always is)."
    ),
    keep: int = typer.Option(3, "--keep-checkpoints", min=1, help="Checkpoints kept in OUT."),
    max_failures: int = typer.Option(
        1, "--max-failures", min=-1, help="Times a failed worker group is restarted from the last checkpoint."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order, augmentation and a fresh HQ head."),
    min_score: float | None = typer.Option(
        None, "--min-score", help="Refined-Parquet sources: keep rows whose score is at least this."
    ),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or bf16: autocast the frozen encoder."),
    cpus_per_worker: float = typer.Option(
        1.0, "--cpus-per-worker", min=0.1, help="CPUs reserved per worker; the rest decode data."
    ),
    log_every: int = typer.Option(10, "--log-every", min=1, help="Print the loss every N steps."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress and loss lines."),
    address: str | None = ADDRESS_OPTION,
    detach: bool = DETACH_OPTION,
    forward_env: list[str] = FORWARD_ENV_OPTION,
) -> None:
    """Retrain the HQ head (SAM frozen) with Ray Train on merged datasets, the official recipe.

    Each sample gets a horizontal flip and large-scale jitter to 1024 and one prompt (tight box, 10
    points or a noisy mask); the loss is point-sampled BCE + dice on the HQ logits; Adam + StepLR.
    Checkpoints go to OUT every epoch (and every --checkpoint-every steps); running the same command
    again resumes from the last one. At the end OUT gets hq_head.pth, model.pth and metrics.json.
    """
    submit_if_requested(address, detach, forward_env)
    from hqsam_core import CheckpointError
    from hqsam_core.zoo import CheckpointSourceError
    from jobs.train import TrainConfig, TrainError, run_train
    from pipeline.train_sources import SourceError

    if model not in VARIANTS:
        fail(f"unknown --model {model!r}; choose one of {', '.join(VARIANTS)}")
    config = TrainConfig(
        data=data,
        out=out,
        model=model,
        checkpoint=checkpoint or f"sam_hq_{model}",
        hq_head=hq_head,
        val=val,
        workers=workers,
        device=device or default_device(),
        batch_size=batch_size,
        epochs=epochs,
        lr=lr,
        lr_drop_epoch=lr_drop_epoch,
        max_steps=max_steps,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep,
        max_failures=max_failures,
        seed=seed,
        min_score=min_score,
        precision=precision,
        cpus_per_worker=cpus_per_worker,
        log_every=log_every,
    )
    try:
        summary = run_train(config, progress=progress)
    except (CheckpointError, CheckpointSourceError, SourceError, TrainError) as error:
        fail(str(error))
    last = summary["epochs"][-1] if summary["epochs"] else {}
    typer.echo(
        f"trained {summary['global_step']} steps ({summary['epochs_completed']} epochs complete), "
        f"last train loss {last.get('train_loss') or float('nan'):.4f}"
    )
    for name in ("hq_head", "full_model"):
        typer.echo(f"{name} -> {summary[name]}")
    typer.echo(f"metrics -> {out.rstrip('/')}/metrics.json")


@app.command()
def export(
    run: str = typer.Argument(..., help="The --out of `hqsam train` (local or s3://)."),
) -> None:
    """Write RUN/hq_head.pth, RUN/model.pth and RUN/metrics.json from the run's last checkpoint."""
    from hqsam_core import CheckpointError
    from jobs.train import TrainError, export_run

    try:
        summary = export_run(run)
    except (CheckpointError, TrainError) as error:
        fail(str(error))
    typer.echo(f"step {summary['global_step']} of {summary['checkpoint']}")
    typer.echo(f"hq_head -> {summary['hq_head']}\nfull_model -> {summary['full_model']}")


@app.command()
def evaluate(
    data: list[str] = typer.Option(..., "--data", help=DATA_HELP),
    out: str = typer.Option(..., "--out", help="JSON report file (local or s3://)."),
    model: str = typer.Option("vit_tiny", "--model", help=MODEL_HELP),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    hq_head: str | None = typer.Option(
        None, "--hq-head", help="HQ head file to combine with a plain SAM checkpoint (e.g. OUT/hq_head.pth)."
    ),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Images per encoder batch."),
    hq_token_only: bool = typer.Option(
        True,
        "--hq-token-only/--no-hq-token-only",
        help="Score the HQ-only output (the paper's HQ-set protocol) or SAM + HQ.",
    ),
    resize: str = typer.Option(
        "square",
        "--resize",
        help="square: images squashed to 1024x1024 as the official evaluation loader does (comparable "
        "with the paper); longest: longest side to 1024, aspect kept, as `hqsam refine` runs.",
    ),
    min_score: float | None = typer.Option(
        None, "--min-score", help="Refined-Parquet sources: keep rows whose score is at least this."
    ),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Evaluate the first N samples of each source."
    ),
    address: str | None = ADDRESS_OPTION,
    detach: bool = DETACH_OPTION,
    forward_env: list[str] = FORWARD_ENV_OPTION,
) -> None:
    """mIoU and mBIoU of SAM's mask, the HQ mask and the original annotation, per source and overall.

    Official protocol: GT tight box prompt, image squashed to 1024x1024 (--resize), HQ mask upsampled
    to the GT size, per-sample means. COCO sources also get mask AP and Boundary AP (COCOeval, min(mask IoU, Boundary
    IoU)). Prints a table (percent) and writes the JSON report (fractions).
    """
    submit_if_requested(address, detach, forward_env)
    from hqsam_core import CheckpointError
    from hqsam_core.zoo import CheckpointSourceError
    from jobs.evaluate import EvaluateConfig, format_table, run_evaluate
    from pipeline.train_sources import SourceError

    if model not in VARIANTS:
        fail(f"unknown --model {model!r}; choose one of {', '.join(VARIANTS)}")
    if resize not in ("square", "longest"):
        fail(f"unknown --resize {resize!r}; choose square or longest")
    config = EvaluateConfig(
        data=data,
        out=out,
        model=model,
        checkpoint=checkpoint or f"sam_hq_{model}",
        hq_head=hq_head,
        device=device or default_device(),
        batch_size=batch_size,
        hq_token_only=hq_token_only,
        resize=resize,
        min_score=min_score,
        limit=limit,
    )
    try:
        report = run_evaluate(config)
    except (CheckpointError, CheckpointSourceError, SourceError) as error:
        fail(str(error))
    typer.echo(format_table(report))
    typer.echo(f"report -> {out}")


if __name__ == "__main__":
    app()
