"""The Ray Train worker of `hqsam train`: DDP over the HQ modules, data from the "train" dataset shard.

Each worker loads BASE (SAM frozen), restores the checkpoint Ray Train hands it (a resumed run) and
runs epochs: Ray Data's prefetch threads augment each sample (`AugmentCollate`, the official recipe),
`train_step` runs one optimizer step, losses are averaged over the workers, rank 0 writes checkpoints through `ray.train.report` (every --checkpoint-every steps and at each epoch's
end), and the validation sources are scored at each epoch's end. Rank 0 tells the driver each step's
loss (`pipeline/train_progress.py`): the workers print nothing of their own.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import ray.train
import ray.train.torch
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import nn

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.allocator import retain_freed_memory
from hqsam.hqsam_core.training import (
    HQTrainingModule,
    augment,
    freeze_sam_,
    load_base,
    make_optimizer,
    sample_seed,
    train_step,
)
from hqsam.pipeline.evaluate_samples import evaluate_rows, summarize_by_source
from hqsam.pipeline.train_checkpoints import checkpoint_name, restore_checkpoint, write_checkpoint
from hqsam.pipeline.train_config import TrainConfig
from hqsam.pipeline.train_progress import StepTeller


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint and restored on resume."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)  # one record per epoch (see epoch_record)
    # This epoch's loss, bce and dice sums, steps and seconds: they survive a resume mid-epoch.
    epoch_totals: list[float] = field(default_factory=lambda: [0.0] * 5)
    starts: list[int] = field(default_factory=list)  # the step each (re)started worker group began at


@dataclass
class Worker:
    """One worker's model, optimizer and progress."""

    config: TrainConfig
    val_rows: list[dict]
    steps_per_epoch: int
    rank: int
    world: int
    device: torch.device
    sam: nn.Module
    net: nn.Module  # HQTrainingModule(sam), in DDP with several workers
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: Progress
    last_report: int  # the global step last reported to Ray Train, -1 for none
    teller: StepTeller  # the driver's progress line (rank 0; a silent one on other ranks)

    @property
    def autocast(self) -> torch.dtype | None:
        return torch.bfloat16 if self.config.precision == "bf16" else None


class AugmentCollate(NumpyBatchCollateFn):
    """Jitter + prompt per sample in Ray Data's prefetch threads (per-sample seeded RNG)."""

    def __init__(self, seed: int, epoch: int) -> None:
        self.seed = seed
        self.epoch = epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> list:
        samples = []
        for key, image, mask in zip(batch["key"], batch["image"], batch["mask"]):
            rng = np.random.default_rng(sample_seed(self.seed, self.epoch, str(key)))
            samples.append(augment(np.asarray(image, np.uint8), np.asarray(mask).astype(bool), rng))
        return samples


def train_loop(loop_config: dict) -> None:
    """Ray Train's per-worker function: TrainConfig's fields plus val_rows, steps_per_epoch and
    progress_queue (the driver's, or None)."""
    worker = start_worker(loop_config)
    shard = ray.train.get_dataset_shard("train")
    max_steps = worker.config.max_steps or math.inf
    while worker.progress.epoch < worker.config.epochs and worker.progress.global_step < max_steps:
        run_epoch(worker, shard)
    if worker.last_report != worker.progress.global_step:
        report(worker, None)


def start_worker(loop_config: dict) -> Worker:
    """Load BASE, freeze SAM, restore the checkpoint of a resumed run, wrap in DDP."""
    config = TrainConfig(**{f.name: loop_config[f.name] for f in fields(TrainConfig)})
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.cpus_per_worker)))
        retain_freed_memory()
    sam = load_base(config.model, config.checkpoint, config.hq_head, seed=config.seed).to(device)
    params = freeze_sam_(sam)
    sam.eval()  # the HQ modules have no train/eval-dependent layers; SAM's BatchNorms must stay eval
    optimizer, scheduler = make_optimizer(params, config.lr, config.lr_drop_epoch)
    progress, last_report = _restore(sam, optimizer, scheduler)
    progress.starts = [*progress.starts, progress.global_step]
    teller = StepTeller(loop_config.get("progress_queue") if rank == 0 else None, config.log_every)
    teller.started(progress.global_step, progress.epoch)
    net = _distributed(HQTrainingModule(sam), world, device)
    torch.manual_seed(config.seed * 1000 + rank + 7919 * progress.global_step)
    return Worker(
        config=config,
        val_rows=loop_config["val_rows"],
        steps_per_epoch=loop_config["steps_per_epoch"],
        rank=rank,
        world=world,
        device=device,
        sam=sam,
        net=net,
        optimizer=optimizer,
        scheduler=scheduler,
        progress=progress,
        last_report=last_report,
        teller=teller,
    )


def _restore(sam: nn.Module, optimizer, scheduler) -> tuple[Progress, int]:
    """The progress of the checkpoint Ray Train hands this worker (its weights loaded), or a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress(), -1
    with checkpoint.as_directory() as directory:
        progress = Progress(**restore_checkpoint(directory, sam, optimizer, scheduler))
    return progress, progress.global_step


def _distributed(module: nn.Module, world: int, device: torch.device) -> nn.Module:
    if world == 1:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


def run_epoch(worker: Worker, shard) -> None:
    """Train the current epoch (from where a resumed run stopped), validate, report a checkpoint."""
    progress = worker.progress
    epoch = progress.epoch
    batches = shard.iter_torch_batches(
        batch_size=worker.config.batch_size,
        drop_last=True,
        collate_fn=AugmentCollate(worker.config.seed, epoch),
        prefetch_batches=2,
    )
    stopped_early = _train_steps(worker, batches, skip=progress.step_in_epoch)
    record = epoch_record(epoch, progress.epoch_totals, worker.optimizer, partial=stopped_early)
    if not stopped_early:
        worker.scheduler.step()
        progress.epoch, progress.step_in_epoch, progress.epoch_totals = epoch + 1, 0, [0.0] * 5
    record["val"] = validate(worker)
    set_record(progress.history, record)
    worker.teller.note(epoch_line(epoch, record, stopped_early))
    report(worker, record, epoch_end=not stopped_early)


def _train_steps(worker: Worker, batches, skip: int) -> bool:
    """The epoch's steps from step `skip` on; True when --max-steps ended them before the epoch's end."""
    progress, config = worker.progress, worker.config
    started, seconds_before = time.monotonic(), progress.epoch_totals[4]
    max_steps = config.max_steps or math.inf
    for index, samples in enumerate(batches):
        if index < skip:
            continue  # resumed mid-epoch: these steps were done before the checkpoint
        values = _step(worker, samples)
        elapsed = time.monotonic() - started
        _count(progress, values, seconds_before + elapsed)
        progress.step_in_epoch = index + 1
        worker.teller.step(progress.global_step, progress.epoch, float(values[0]))
        if progress.global_step >= max_steps:
            return True
        if config.checkpoint_every and progress.global_step % config.checkpoint_every == 0:
            report(worker, None)
    return False


def _step(worker: Worker, samples: list) -> torch.Tensor:
    """One optimizer step; [loss, bce, dice] averaged over the workers, on the CPU."""
    values = train_step(worker.net, worker.sam, worker.optimizer, samples, encoder_autocast=worker.autocast)
    if worker.world > 1:  # on the step's device: NCCL reduces GPU tensors only
        torch.distributed.all_reduce(values)
        values /= worker.world
    return values.cpu().double()


def _count(progress: Progress, values: torch.Tensor, seconds: float) -> None:
    totals = progress.epoch_totals
    for k in range(3):
        totals[k] += float(values[k])
    totals[3] += 1
    totals[4] = seconds
    progress.global_step += 1


def report(worker: Worker, record: dict | None, *, epoch_end: bool = False) -> None:
    """Report metrics to Ray Train, rank 0 with a checkpoint (every rank must report)."""
    progress = worker.progress
    metrics = {"global_step": progress.global_step, "epoch": progress.epoch}
    if record is not None:
        metrics.update({k: v for k, v in record.items() if isinstance(v, int | float)})
    name = checkpoint_name(progress.global_step, progress.epoch if epoch_end else None)
    if worker.rank == 0:
        with tempfile.TemporaryDirectory() as directory:
            write_checkpoint(directory, worker.sam, worker.optimizer, worker.scheduler, asdict(progress))
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=name
            )
    else:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
    worker.last_report = progress.global_step


def validate(worker: Worker) -> dict | None:
    """The validation sources' scores per source and overall, each worker scoring its share."""
    if not worker.val_rows:
        return None
    from hqsam.hqsam_core.refiner import BoxRefiner

    refiner = BoxRefiner(worker.sam, worker.device)
    rows = worker.val_rows[worker.rank :: worker.world]
    part = evaluate_rows(refiner, rows, worker.config.batch_size)
    if worker.world > 1:
        gathered = [None] * worker.world
        torch.distributed.all_gather_object(gathered, part)
    else:
        gathered = [part]
    merged: dict[str, list] = defaultdict(list)
    sources: list[str] = []
    for per_sample, part_sources, _ in gathered:
        for key, values in per_sample.items():
            merged[key].extend(values)
        sources.extend(part_sources)
    summary = summarize_by_source(dict(merged), sources)
    summary["skipped"] = sum(skipped for _, _, skipped in gathered)
    return summary


def epoch_record(epoch: int, totals: list[float], optimizer, *, partial: bool) -> dict:
    """An epoch's line in metrics.json: mean losses, steps, lr, seconds."""
    steps = int(totals[3])
    return {
        "epoch": epoch + 1,
        "steps": steps,
        "partial": partial,  # stopped by --max-steps before the epoch's end
        "train_loss": totals[0] / steps if steps else None,
        "train_bce": totals[1] / steps if steps else None,
        "train_dice": totals[2] / steps if steps else None,
        "lr": optimizer.param_groups[0]["lr"],
        "seconds": round(totals[4], 3),
    }


def set_record(history: list, record: dict) -> None:
    """One record per epoch: a later record of the same epoch (a resumed partial one) replaces it."""
    record = json.loads(json.dumps(record, default=storage.json_scalar))  # plain types: weights_only loads
    history[:] = [r for r in history if r["epoch"] != record["epoch"]] + [record]


def epoch_line(epoch: int, record: dict, stopped_early: bool) -> str:
    """An epoch's end for the driver's log: its mean loss and validation scores."""
    val = (record["val"] or {}).get("overall", {})
    shown = "".join(f", {k} {v:.4f}" for k, v in val.items() if isinstance(v, float))
    return (
        f"epoch {epoch + 1} {'stopped at --max-steps' if stopped_early else 'done'}: "
        f"loss {record['train_loss'] or float('nan'):.4f}{shown}"
    )
