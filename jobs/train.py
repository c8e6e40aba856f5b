"""`hqsam train` (retrain the HQ head with Ray Train, SAM frozen) and `hqsam export`.

The run itself is `pipeline/train_run.py`; its workers `pipeline/train_worker.py`; checkpoints and
the export `pipeline/train_checkpoints.py`; the recipe `hqsam_core/training.py`.
"""

from __future__ import annotations

import enum

import typer

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
    Variant,
    checkpoint_or_default,
    device_or_default,
)


class TrainPrecision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"


DATA_HELP = (
    "Data source; repeat to merge several. An image+gt folder pair SRC (SRC/im/*.jpg|png, SRC/gt/*.png by "
    "stem), a COCO instances JSON, or the OUT of `hqsam refine` (status ok rows); local or s3://, gs://. "
    "Options after '::': weight=W (sample it W times per epoch), images=ROOT (COCO image root)."
)
OUT_HELP = "Run folder (local or s3://): checkpoints, hq_head.pth, model.pth, metrics.json."
LR_DROP_OPTION = typer.Option(10, "--lr-drop-epoch", min=1, help="Multiply the lr by 0.1 every N epochs.")
MAX_STEPS_OPTION = typer.Option(None, "--max-steps", min=1, help="Stop after N steps in all (smoke runs).")
CHECKPOINT_EVERY_OPTION = typer.Option(
    None, "--checkpoint-every", min=1, help="Also checkpoint every K steps (every epoch's end always is)."
)
MAX_FAILURES_OPTION = typer.Option(
    1, "--max-failures", min=-1, help="Times a failed worker group is restarted from the last checkpoint."
)
MIN_SCORE_OPTION = typer.Option(
    None, "--min-score", help="Refined-Parquet sources: keep rows whose score is at least this."
)
PRECISION_OPTION = typer.Option(
    TrainPrecision.fp32, "--precision", help="fp32, or bf16: autocast the frozen encoder."
)
CPUS_OPTION = typer.Option(
    1.0, "--cpus-per-worker", min=0.1, help="CPUs reserved per worker; the rest decode data."
)


def train(
    ctx: typer.Context,
    data: list[str] = typer.Option(..., "--data", help=DATA_HELP),
    out: str = typer.Option(..., "--out", help=OUT_HELP),
    model: Variant = MODEL_OPTION,
    checkpoint: str | None = CHECKPOINT_OPTION,
    hq_head: str | None = HQ_HEAD_OPTION,
    checkpoint_sha256: str | None = CHECKPOINT_SHA256_OPTION,
    val: list[str] = typer.Option([], "--val", help="Validation source (same forms as --data); repeatable."),
    workers: int = typer.Option(1, "--workers", min=1, help="Ray Train workers (one GPU each with cuda)."),
    device: Device | None = DEVICE_OPTION,
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Samples per worker per step."),
    epochs: int = typer.Option(12, "--epochs", min=1, help="Epochs over the merged data."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Adam learning rate (no weight decay)."),
    lr_drop_epoch: int = LR_DROP_OPTION,
    max_steps: int | None = MAX_STEPS_OPTION,
    checkpoint_every: int | None = CHECKPOINT_EVERY_OPTION,
    keep: int = typer.Option(3, "--keep-checkpoints", min=1, help="Checkpoints kept in OUT."),
    max_failures: int = MAX_FAILURES_OPTION,
    seed: int = typer.Option(0, "--seed", help="Seed of the data order, augmentation and a fresh HQ head."),
    min_score: float | None = MIN_SCORE_OPTION,
    precision: TrainPrecision = PRECISION_OPTION,
    cpus_per_worker: float = CPUS_OPTION,
    log_every: int = typer.Option(
        10, "--log-every", min=1, help="Progress shows the mean loss of the last N steps."
    ),
    progress: bool = PROGRESS_OPTION,
    verbose: bool = VERBOSE_OPTION,
    address: str | None = ADDRESS_OPTION,
    detach: bool = DETACH_OPTION,
    forward_env: list[str] = FORWARD_ENV_OPTION,
) -> None:
    """Retrain the HQ head with Ray Train on merged datasets, the official recipe (flip, large-scale
    jitter, box / points / noisy-mask prompts, point-sampled BCE + dice, Adam + StepLR).

    --checkpoint is BASE, SAM or HQ-SAM: SAM stays frozen, exported bit-identical; a plain SAM file
    starts a fresh HQ head. OUT gets a checkpoint every epoch (and every --checkpoint-every steps);
    the same command again resumes. At the end OUT gets hq_head.pth, model.pth and metrics.json.
    """
    from hqsam.pipeline.submission import submit_if_requested

    submit_if_requested(ctx, address, detach, forward_env)
    from hqsam.pipeline.train_config import TrainConfig
    from hqsam.pipeline.train_run import run_train

    config = TrainConfig(
        data=data,
        out=out,
        model=model.value,
        checkpoint=checkpoint_or_default(checkpoint, model, checkpoint_sha256),
        hq_head=hq_head,
        val=val,
        workers=workers,
        device=device_or_default(device),
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
        precision=precision.value,
        cpus_per_worker=cpus_per_worker,
        log_every=log_every,
    )
    _print_summary(run_train(config, progress=progress), out)


def _print_summary(summary: dict, out: str) -> None:
    last = summary["epochs"][-1] if summary["epochs"] else {}
    typer.echo(
        f"trained {summary['global_step']} steps ({summary['epochs_completed']} epochs complete), "
        f"last train loss {last.get('train_loss') or float('nan'):.4f}"
    )
    for name in ("hq_head", "full_model"):
        typer.echo(f"{name} -> {summary[name]}")
    typer.echo(f"metrics -> {out.rstrip('/')}/metrics.json")


def export(
    run: str = typer.Argument(..., help="The --out of `hqsam train` (local or s3://)."),
) -> None:
    """Write RUN/hq_head.pth, RUN/model.pth and RUN/metrics.json from the run's last checkpoint."""
    from hqsam.pipeline.train_checkpoints import export_run

    summary = export_run(run)
    typer.echo(f"step {summary['global_step']} of {summary['checkpoint']}")
    typer.echo(f"hq_head -> {summary['hq_head']}\nfull_model -> {summary['full_model']}")
