"""`hqsam train`: retrain the HQ head with Ray Train on merged datasets, SAM frozen; `hqsam export`.

Driver: parse the sources into light rows (no pixels), check the base checkpoint, start a
`TorchTrainer` whose workers stream decoded samples from Ray Data (`get_dataset_shard`), then export
the last checkpoint. Workers: the official recipe (hqsam_core.training) in DDP, checkpoints through
`ray.train.report` every epoch and every `checkpoint_every` steps, validation at each epoch's end.

OUT holds Ray Train's run (checkpoint_<step> folders, its snapshot), `train_config.json`, and at the
end `hq_head.pth`, `model.pth` and `metrics.json`. Running the same command again resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.allocator import retain_freed_memory
from hqsam.hqsam_core.build import build_hqsam, check_checkpoint
from hqsam.hqsam_core.checkpoint import is_hq_key, save_hq_head, save_model
from hqsam.hqsam_core.errors import HqsamError
from hqsam.hqsam_core.training import (
    HQTrainingModule,
    freeze_sam_,
    large_scale_jitter,
    point_sampled_loss,
    preprocess_batch,
    sample_prompt,
)
from hqsam.pipeline.evaluate_samples import evaluate_rows, summarize_by_source
from hqsam.pipeline.train_sources import (
    build_dataset,
    merge_sources,
    parse_source,
    sample_seed,
    shuffled,
)

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
SAVED_PROGRESS = ("epoch", "step_in_epoch", "global_step", "history", "epoch_totals", "starts")
PROGRESS_FILE = "progress.json"
CONFIG_FILE = "train_config.json"
# Settings that must not change between a run and its resumption: they define what is trained.
RUN_IDENTITY = ("model", "checkpoint", "hq_head")


class TrainError(HqsamError, ValueError):
    """A training run that cannot start or export; the message is one sentence."""


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    model: str = "vit_tiny"
    checkpoint: str = "sam_hq_vit_tiny"  # BASE: SAM or HQ-SAM weights; SAM stays as it is
    hq_head: str | None = None  # start the HQ head from this file instead of BASE's (or random)
    val: list[str] = field(default_factory=list)
    workers: int = 1
    device: str = "cpu"
    batch_size: int = 4  # per worker
    epochs: int = 12
    lr: float = 1e-3
    lr_drop_epoch: int = 10
    max_steps: int | None = None
    checkpoint_every: int | None = None  # steps; every epoch's end is always checkpointed
    keep_checkpoints: int = 3
    max_failures: int = 1
    seed: int = 0
    min_score: float | None = None
    precision: str = "fp32"  # or bf16: autocast of the frozen encoder
    cpus_per_worker: float = 1.0
    log_every: int = 10


# ---------------------------------------------------------------------------------------------
# The per-step work (also used in-process by tests and the benchmark)


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
    """The official per-sample recipe: flip + large-scale jitter to 1024, then one random prompt."""
    image, mask = large_scale_jitter(image, mask, rng)
    return image, mask, sample_prompt(mask, rng)


def train_step(
    net: torch.nn.Module,
    sam: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    samples: list[tuple[np.ndarray, np.ndarray, object]],
    *,
    encoder_autocast: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One optimizer step on (image 1024x1024x3 uint8, mask 1024x1024 bool, Prompt) samples.

    `net` is `HQTrainingModule(sam)`, or that wrapped in DDP. Returns [loss, bce, dice] (detached).
    """
    images = preprocess_batch(sam, [s[0] for s in samples])
    targets = torch.from_numpy(np.stack([s[1] for s in samples])[:, None]).to(images.device).float()
    logits = net(images, [s[2] for s in samples], encoder_autocast)
    bce, dice = point_sampled_loss(logits, targets, generator=generator)
    loss = bce + dice
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return torch.stack([loss, bce, dice]).detach()


def make_optimizer(params, lr: float, lr_drop_epoch: int):
    """Adam without weight decay, lr x0.1 after `lr_drop_epoch` epochs (scheduler stepped per epoch)."""
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, lr_drop_epoch), gamma=0.1)
    return optimizer, scheduler


def load_base(config: dict) -> torch.nn.Module:
    """BASE with its HQ head (or `hq_head`, or a fresh seeded head for a plain SAM BASE)."""
    torch.manual_seed(config["seed"])  # the fresh HQ head of a plain SAM base is the same everywhere
    with _fresh_head_expected():
        return build_hqsam(
            config["model"], config["checkpoint"], config["hq_head"], allow_random_hq_head=True
        )


@contextlib.contextmanager
def _fresh_head_expected():
    """build_hqsam warns that a plain SAM checkpoint leaves the HQ head random ("testing only"):
    for training that head is the one to train, so the warning is not shown."""
    build_log = logging.getLogger("hqsam.hqsam_core.build")
    level = build_log.level
    build_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        build_log.setLevel(level)


# ---------------------------------------------------------------------------------------------
# The Ray Train worker


def train_loop(config: dict) -> None:
    """Ray Train worker: DDP over the HQ modules, data from the "train" dataset shard."""
    import ray.train
    import ray.train.torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
        retain_freed_memory()

    sam = load_base(config).to(device)
    params = freeze_sam_(sam)
    sam.eval()  # the HQ modules have no train/eval-dependent layers; SAM's BatchNorms must stay eval
    optimizer, scheduler = make_optimizer(params, config["lr"], config["lr_drop_epoch"])
    state = {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "history": [],
        "epoch_totals": [0.0] * 5,
        "starts": [],  # the step each (re)started worker group began at
    }
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
        missing = sam.load_state_dict(saved["hq_state"], strict=False)
        if missing.unexpected_keys or any(is_hq_key(k) for k in missing.missing_keys):
            raise RuntimeError("the checkpoint's HQ head does not fit this model")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state.update({k: saved.get(k, state[k]) for k in SAVED_PROGRESS})
        if rank == 0:
            print(
                f"[hqsam train] resuming at step {saved['global_step']} (epoch {saved['epoch'] + 1})",
                flush=True,
            )

    state["starts"] = [*state["starts"], state["global_step"]]

    module = HQTrainingModule(sam)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    else:
        net = module
    autocast = torch.bfloat16 if config["precision"] == "bf16" else None
    torch.manual_seed(config["seed"] * 1000 + rank + 7919 * state["global_step"])

    class Collate(NumpyBatchCollateFn):
        """Jitter + prompt per sample in Ray Data's prefetch threads (per-sample seeded RNG)."""

        def __init__(self, epoch: int) -> None:
            self.epoch = epoch

        def __call__(self, batch: dict[str, np.ndarray]) -> list:
            out = []
            for key, image, mask in zip(batch["key"], batch["image"], batch["mask"]):
                rng = np.random.default_rng(sample_seed(config["seed"], self.epoch, str(key)))
                out.append(augment(np.asarray(image, np.uint8), np.asarray(mask).astype(bool), rng))
            return out

    shard = ray.train.get_dataset_shard("train")
    val_rows = config["val_rows"]
    max_steps = config["max_steps"] or math.inf
    steps_per_epoch = config["steps_per_epoch"]
    last_report = state["global_step"] if checkpoint is not None else -1

    def report(epoch_record: dict | None, *, epoch_end: bool = False) -> None:
        nonlocal last_report
        metrics = {"global_step": state["global_step"], "epoch": state["epoch"]}
        if epoch_record is not None:
            metrics.update({k: v for k, v in epoch_record.items() if isinstance(v, int | float)})
        # An epoch's end may fall on a --checkpoint-every step: it gets its own folder.
        name = f"checkpoint_{state['global_step']:08d}" + (f"_epoch{state['epoch']}" if epoch_end else "")
        if rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                payload = {
                    "hq_state": {k: v.detach().cpu() for k, v in sam.state_dict().items() if is_hq_key(k)},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    **{k: state[k] for k in SAVED_PROGRESS},
                }
                torch.save(payload, os.path.join(directory, STATE_FILE))
                with open(os.path.join(directory, PROGRESS_FILE), "w") as handle:
                    json.dump({k: state[k] for k in ("epoch", "step_in_epoch", "global_step")}, handle)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(directory),
                    checkpoint_dir_name=name,
                )
        else:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        last_report = state["global_step"]

    def validate() -> dict | None:
        if not val_rows:
            return None
        from hqsam.hqsam_core.refiner import BoxRefiner

        refiner = BoxRefiner(sam, device)
        per_sample, sources, skipped = evaluate_rows(refiner, val_rows[rank::world], config["batch_size"])
        gathered = [None] * world
        if world > 1:
            torch.distributed.all_gather_object(gathered, (per_sample, sources, skipped))
        else:
            gathered = [(per_sample, sources, skipped)]
        merged: dict[str, list] = defaultdict(list)
        all_sources: list[str] = []
        for part, part_sources, _ in gathered:
            for key, values in part.items():
                merged[key].extend(values)
            all_sources.extend(part_sources)
        summary = summarize_by_source(dict(merged), all_sources)
        summary["skipped"] = sum(g[2] for g in gathered)
        return summary

    while state["epoch"] < config["epochs"] and state["global_step"] < max_steps:
        epoch = state["epoch"]
        skip = state["step_in_epoch"]
        totals = state["epoch_totals"]  # loss, bce, dice sums, steps, seconds: survive a resume
        started = time.monotonic()
        seconds_before = totals[4]
        stopped_early = False
        batches = shard.iter_torch_batches(
            batch_size=config["batch_size"], drop_last=True, collate_fn=Collate(epoch), prefetch_batches=2
        )
        for index, samples in enumerate(batches):
            if index < skip:
                continue  # resumed mid-epoch: these steps were done before the checkpoint
            values = train_step(net, sam, optimizer, samples, encoder_autocast=autocast)
            if world > 1:  # on the step's device: NCCL reduces GPU tensors only
                torch.distributed.all_reduce(values)
                values /= world
            values = values.cpu().double()
            for k in range(3):
                totals[k] += float(values[k])
            totals[3] += 1
            totals[4] = seconds_before + time.monotonic() - started
            state["global_step"] += 1
            state["step_in_epoch"] = index + 1
            if rank == 0 and (state["global_step"] % config["log_every"] == 0 or state["global_step"] == 1):
                rate = (index + 1 - skip) * config["batch_size"] / max(time.monotonic() - started, 1e-9)
                print(
                    f"[hqsam train] epoch {epoch + 1}/{config['epochs']} step {index + 1}/{steps_per_epoch} "
                    f"(total {state['global_step']}) loss {values[0]:.4f} bce {values[1]:.4f} "
                    f"dice {values[2]:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                    f"{rate:.2f} samples/s/worker",
                    flush=True,
                )
            if state["global_step"] >= max_steps:
                stopped_early = True
                break
            if config["checkpoint_every"] and state["global_step"] % config["checkpoint_every"] == 0:
                report(None)
        record = _epoch_record(epoch, totals, optimizer, partial=stopped_early)
        if not stopped_early:
            scheduler.step()
            state["epoch"], state["step_in_epoch"], state["epoch_totals"] = epoch + 1, 0, [0.0] * 5
        record["val"] = validate()
        _set_record(state["history"], record)
        if rank == 0:
            val = (record["val"] or {}).get("overall", {})
            shown = " ".join(f"{k} {v:.4f}" for k, v in val.items() if isinstance(v, float))
            print(
                f"[hqsam train] epoch {epoch + 1} {'stopped at --max-steps' if stopped_early else 'done'}: "
                f"loss {record['train_loss'] or float('nan'):.4f} {shown}",
                flush=True,
            )
        report(record, epoch_end=not stopped_early)
    if last_report != state["global_step"]:
        report(None)


def _epoch_record(epoch: int, totals: list[float], optimizer, *, partial: bool) -> dict:
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


def _set_record(history: list, record: dict) -> None:
    """One record per epoch: a later record of the same epoch (a resumed partial one) replaces it."""
    record = json.loads(json.dumps(record, default=storage.json_scalar))  # plain types: weights_only loads
    history[:] = [r for r in history if r["epoch"] != record["epoch"]] + [record]


# ---------------------------------------------------------------------------------------------
# The driver


def run_train(config: TrainConfig, *, progress: bool = True) -> dict:
    """Train (or resume) and export; returns the summary (metrics.json's content)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    started = time.time()
    _check_config(config)
    sources = [parse_source(text) for text in config.data]
    rows, counts = merge_sources(sources, min_score=config.min_score, seed=config.seed)
    rows = shuffled(rows, config.seed)
    val_rows: list[dict] = []
    if config.val:
        val_table, _ = merge_sources([parse_source(text) for text in config.val], min_score=config.min_score)
        val_rows = val_table.to_pylist()  # weights do not apply to validation
    global_batch = config.workers * config.batch_size
    steps_per_epoch = rows.num_rows // global_batch
    if steps_per_epoch == 0:
        raise TrainError(
            f"{rows.num_rows} training samples are fewer than one step needs "
            f"({config.workers} workers x batch size {config.batch_size})"
        )
    with _fresh_head_expected():
        check_checkpoint(config.model, config.checkpoint, config.hq_head, allow_random_hq_head=True)
    _record_config(config)

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=progress, configure_logging=False)
        # A local Ray of our own: workers that reserve every CPU would leave none to decode data
        # and the run would wait forever; say so now. (A cluster may still be scaling up.)
        free = ray.cluster_resources().get("CPU", 0) - config.workers * config.cpus_per_worker
        if free < 1:
            raise TrainError(
                f"{config.workers} workers x {config.cpus_per_worker:g} CPUs leave {max(free, 0):g} of this "
                "machine's CPUs for reading data; lower --workers or --cpus-per-worker"
            )
    # Ray Data's bars would interleave with the workers' loss lines; those are the progress shown.
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = build_dataset(rows)

    use_gpu = config.device.startswith("cuda")
    storage_path, name, filesystem = _storage(config.out)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            **asdict(config),
            "val_rows": val_rows,
            "steps_per_epoch": steps_per_epoch,
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
            # Ray Train's print patch would echo every progress line twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
        datasets={"train": dataset},
    )
    log.info(
        "training on %d samples (%s), %d steps per epoch, %d workers",
        rows.num_rows,
        ", ".join(f"{k}: {v}" for k, v in counts.items()),
        steps_per_epoch,
        config.workers,
    )
    result = trainer.fit()
    if result.checkpoint is not None:
        summary = export_run(
            config.out, checkpoint_uri=result.checkpoint.path, filesystem=result.checkpoint.filesystem
        )
    else:  # a finished run started again trains nothing and reports nothing: export its last one
        summary = export_run(config.out)
    summary.update(
        samples_per_epoch=rows.num_rows,
        samples_per_source=counts,
        steps_per_epoch=steps_per_epoch,
        wall_time_s=round(time.time() - started, 3),
    )
    storage.write_json(f"{config.out.rstrip('/')}/metrics.json", summary)
    return summary


def _check_config(config: TrainConfig) -> None:
    if config.workers < 1 or config.batch_size < 1 or config.epochs < 1:
        raise TrainError("--workers, --batch-size and --epochs must be at least 1")
    if config.precision not in ("fp32", "bf16"):
        raise TrainError(f"--precision must be fp32 or bf16, not {config.precision!r}")
    if config.device not in ("cpu", "cuda"):
        raise TrainError(f"--device must be cpu or cuda, not {config.device!r}")
    if not config.data:
        raise TrainError("pass at least one --data source")


def _record_config(config: TrainConfig) -> None:
    """Write OUT/train_config.json, or check that an existing run in OUT trains the same thing."""
    uri = f"{config.out.rstrip('/')}/{CONFIG_FILE}"
    fs, path = storage.url_to_fs(uri)
    current = asdict(config)
    if fs.exists(path):
        previous = json.loads(storage.read_bytes(uri))
        changed = [key for key in RUN_IDENTITY if previous.get(key) != current.get(key)]
        if changed:
            raise TrainError(
                f"{config.out} holds a run with another {changed[0]} ({previous.get(changed[0])!r}); "
                "pass a new --out or the same settings to resume it"
            )
        current["started"] = previous.get("started")
    else:
        current["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    storage.write_json(uri, current)


def _storage(out: str):
    """RunConfig's storage_path, name and filesystem for OUT (the run's folder is OUT itself)."""
    out = out.rstrip("/")
    if not storage.has_scheme(out) or out.startswith("file://"):
        path = os.path.abspath(out.removeprefix("file://"))
        return os.path.dirname(path), os.path.basename(path), None
    import pyarrow.fs

    fs, path = storage.url_to_fs(out)
    parent, name = posixpath.split(path.rstrip("/"))
    return parent, name, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


# ---------------------------------------------------------------------------------------------
# Export


def latest_checkpoint(out: str) -> str:
    """URI of the checkpoint folder in OUT with the highest step."""
    fs, path = storage.url_to_fs(out.rstrip("/"))
    best, best_step = None, (-1, -1)
    for name in fs.glob(f"{path.rstrip('/')}/checkpoint_*/{PROGRESS_FILE}"):
        try:
            with fs.open(name, "rb") as handle:
                progress = json.load(handle)
            step = (progress["global_step"], progress["epoch"])
        except (OSError, ValueError, KeyError):
            continue
        if step > best_step:
            best, best_step = posixpath.dirname(name), step
    if best is None:
        raise TrainError(f"{out} holds no complete checkpoint of `hqsam train`")
    if storage.is_local(fs):
        return best
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{best}"


def export_run(out: str, *, checkpoint_uri: str | None = None, filesystem=None) -> dict:
    """Write OUT/hq_head.pth, OUT/model.pth and OUT/metrics.json from a checkpoint (default: the last).

    `filesystem` is the pyarrow filesystem `checkpoint_uri` lives on (from a Ray Train result).
    """
    out = out.rstrip("/")
    config_uri = f"{out}/{CONFIG_FILE}"
    try:
        config = json.loads(storage.read_bytes(config_uri))
    except FileNotFoundError:
        raise TrainError(f"{out} is not an `hqsam train` run: it has no {CONFIG_FILE}") from None
    if checkpoint_uri is None:
        checkpoint_uri = latest_checkpoint(out)
        filesystem = None
    state = _read_state(checkpoint_uri, filesystem)
    model = build_hqsam(config["model"], config["checkpoint"], config["hq_head"], allow_random_hq_head=True)
    expected = {k for k in model.state_dict() if is_hq_key(k)}
    if set(state["hq_state"]) != expected:
        raise TrainError(f"{checkpoint_uri} does not hold the HQ head of a {config['model']} model")
    model.load_state_dict(state["hq_state"], strict=False)
    save_hq_head(model, f"{out}/hq_head.pth")
    save_model(model, f"{out}/model.pth")
    summary = {
        "model": config["model"],
        "base_checkpoint": config["checkpoint"],
        "hq_head_init": config["hq_head"],
        "global_step": state["global_step"],
        "epochs_completed": state["epoch"],
        "checkpoint": checkpoint_uri,
        "epochs": state["history"],
        "starts": state.get("starts", []),
        "hq_head": f"{out}/hq_head.pth",
        "full_model": f"{out}/model.pth",
        "config": {k: v for k, v in config.items() if k != "started"},
    }
    storage.write_json(f"{out}/metrics.json", summary)
    return summary


def _read_state(checkpoint_uri: str, filesystem) -> dict:
    if filesystem is not None:
        with filesystem.open_input_stream(posixpath.join(checkpoint_uri, STATE_FILE)) as handle:
            data = handle.read()
    else:
        data = storage.read_bytes(posixpath.join(checkpoint_uri, STATE_FILE))
    import io

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


__all__ = [
    "TrainConfig",
    "TrainError",
    "augment",
    "export_run",
    "make_optimizer",
    "run_train",
    "train_loop",
    "train_step",
]


# --- the `hqsam train` command ------------------------------------------------------------------
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


DATA_HELP = (
    "Data source; repeat to merge several. An image+gt folder pair SRC (SRC/im/*.jpg|png, SRC/gt/*.png by "
    "stem), a COCO instances JSON, or the OUT of `hqsam refine` (status ok rows); local or s3://, gs://. "
    "Options after '::': weight=W (sample it W times per epoch), images=ROOT (COCO image root)."
)


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
    from hqsam.hqsam_core import CheckpointError
    from hqsam.hqsam_core.zoo import CheckpointSourceError
    from hqsam.jobs.train import TrainConfig, TrainError, run_train
    from hqsam.pipeline.train_sources import SourceError

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


def export(
    run: str = typer.Argument(..., help="The --out of `hqsam train` (local or s3://)."),
) -> None:
    """Write RUN/hq_head.pth, RUN/model.pth and RUN/metrics.json from the run's last checkpoint."""
    from hqsam.hqsam_core import CheckpointError
    from hqsam.jobs.train import TrainError, export_run

    try:
        summary = export_run(run)
    except (CheckpointError, TrainError) as error:
        fail(str(error))
    typer.echo(f"step {summary['global_step']} of {summary['checkpoint']}")
    typer.echo(f"hq_head -> {summary['hq_head']}\nfull_model -> {summary['full_model']}")
