"""An `hqsam train` run: the driver side.

Parse the sources into light rows (no pixels), check the settings and the base checkpoint, record
the settings in OUT, start a `TorchTrainer` whose workers (`pipeline/train_worker.py`) stream
decoded samples from Ray Data, shows their progress (`pipeline/train_progress.py`), then export the
last checkpoint (`pipeline/train_checkpoints.py`).

OUT holds Ray Train's run (checkpoint_<step> folders, its snapshot), `train_config.json`, and at the
end `hq_head.pth`, `model.pth` and `metrics.json`. Running the same command again resumes.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from dataclasses import asdict, dataclass

import pyarrow as pa

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.training import check_base
from hqsam.pipeline.cluster import init_ray
from hqsam.pipeline.load_samples import LoadSamples
from hqsam.pipeline.stage import apply_ray
from hqsam.pipeline.train_checkpoints import export_run
from hqsam.pipeline.train_config import TrainConfig, TrainError, check_config, record_config
from hqsam.pipeline.train_progress import TrainingProgress
from hqsam.pipeline.train_sources import merge_sources, parse_source, shuffled

log = logging.getLogger(__name__)

ROWS_PER_BLOCK = 8  # source rows one Ray task reads and decodes at once


@dataclass
class TrainingData:
    rows: pa.Table  # the training samples' source rows, weights applied, shuffled
    counts: dict[str, int]  # distinct samples per source
    val_rows: list[dict]  # validation source rows (no weights)
    steps_per_epoch: int


def run_train(config: TrainConfig, *, progress: bool = True) -> dict:
    """Train (or resume) and export; returns the summary (metrics.json's content)."""
    started = time.time()
    check_config(config)
    data = training_data(config)
    check_base(config.model, config.checkpoint, config.hq_head)
    record_config(config)
    _start_ray(config)
    log.info(
        "training on %d samples (%s), %d steps per epoch, %d workers",
        data.rows.num_rows,
        ", ".join(f"{k}: {v}" for k, v in data.counts.items()),
        data.steps_per_epoch,
        config.workers,
    )
    total = data.steps_per_epoch * config.epochs
    with TrainingProgress(
        min(total, config.max_steps or total),
        config.workers * config.batch_size,
        config.epochs,
        enabled=progress,
    ) as shown:
        result = _trainer(config, data, shown.queue).fit()
    # A finished run started again trains nothing and reports no checkpoint: export its last one.
    checkpoint = None
    if result.checkpoint is not None:  # a folder of OUT: Ray Train's run folder is OUT itself
        name = posixpath.basename(result.checkpoint.path.rstrip("/"))
        checkpoint = storage.join(storage.absolute(config.out.rstrip("/")), name)
    summary = export_run(config.out, checkpoint, base=(config.checkpoint, config.hq_head))
    summary.update(
        samples_per_epoch=data.rows.num_rows,
        samples_per_source=data.counts,
        steps_per_epoch=data.steps_per_epoch,
        wall_time_s=round(time.time() - started, 3),
    )
    storage.write_json(f"{config.out.rstrip('/')}/metrics.json", summary)
    return summary


def training_data(config: TrainConfig) -> TrainingData:
    """The training and validation source rows; TrainError when one step needs more samples."""
    sources = [parse_source(text) for text in config.data]
    rows, counts = merge_sources(sources, min_score=config.min_score, seed=config.seed)
    rows = shuffled(rows, config.seed)
    val_rows: list[dict] = []
    if config.val:
        val_table, _ = merge_sources([parse_source(text) for text in config.val], min_score=config.min_score)
        val_rows = val_table.to_pylist()  # weights do not apply to validation
    steps_per_epoch = rows.num_rows // (config.workers * config.batch_size)
    if steps_per_epoch == 0:
        raise TrainError(
            f"{rows.num_rows} training samples are fewer than one step needs "
            f"({config.workers} workers x batch size {config.batch_size})"
        )
    return TrainingData(rows, counts, val_rows, steps_per_epoch)


def sample_dataset(rows: pa.Table):
    """A lazy Ray dataset of decoded training samples (`LoadSamples`).

    Only the light rows live on the driver; each block of rows is read and decoded by a Ray task
    wherever it runs, and every epoch visits the blocks in a new order.
    """
    import ray

    blocks = [rows.slice(start, ROWS_PER_BLOCK) for start in range(0, rows.num_rows, ROWS_PER_BLOCK)]
    dataset = ray.data.from_arrow(blocks or [rows]).randomize_block_order()
    return apply_ray(dataset, [LoadSamples()])


def _start_ray(config: TrainConfig) -> None:
    import ray

    own = not ray.is_initialized()
    init_ray()
    if own:
        # A local Ray of our own: workers that reserve every CPU would leave none to decode data
        # and the run would wait forever; say so now. (A cluster may still be scaling up.)
        free = ray.cluster_resources().get("CPU", 0) - config.workers * config.cpus_per_worker
        if free < 1:
            raise TrainError(
                f"{config.workers} workers x {config.cpus_per_worker:g} CPUs leave {max(free, 0):g} of this "
                "machine's CPUs for reading data; lower --workers or --cpus-per-worker"
            )


def _trainer(config: TrainConfig, data: TrainingData, progress_queue=None):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from hqsam.pipeline.train_worker import train_loop

    use_gpu = config.device.startswith("cuda")
    storage_path, name, filesystem = _ray_storage(config.out)
    return TorchTrainer(
        train_loop,
        train_loop_config={
            **asdict(config),
            "val_rows": data.val_rows,
            "steps_per_epoch": data.steps_per_epoch,
            "progress_queue": progress_queue,  # rank 0's steps and losses for the driver
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        ),
        datasets={"train": sample_dataset(data.rows)},
    )


def _ray_storage(out: str):
    """RunConfig's storage_path, name and filesystem for OUT (the run's folder is OUT itself)."""
    out = out.rstrip("/")
    if not storage.has_scheme(out) or out.startswith("file://"):
        path = os.path.abspath(out.removeprefix("file://"))
        return os.path.dirname(path), os.path.basename(path), None
    import pyarrow.fs

    fs, path = storage.url_to_fs(out)
    parent, name = posixpath.split(path.rstrip("/"))
    return parent, name, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
