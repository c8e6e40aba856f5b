"""Training checkpoints (one format, written and read here) and the export of a run.

A checkpoint is a folder `OUT/checkpoint_<step>[_epoch<E>]` (Ray Train registers it) holding
`train_state.pt` (the HQ head, optimizer, scheduler and progress) and `progress.json` (epoch and
steps, for picking the latest without loading weights). `export_run` writes OUT/hq_head.pth,
OUT/model.pth and OUT/metrics.json from one of them.
"""

from __future__ import annotations

import io
import posixpath

import torch
from torch import nn

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.checkpoint import is_hq_key, save_hq_head, save_model
from hqsam.hqsam_core.training import load_base
from hqsam.pipeline.train_config import TrainError, read_config

STATE_FILE = "train_state.pt"
PROGRESS_FILE = "progress.json"
CHECKPOINT_PREFIX = "checkpoint_"
# The progress saved with a checkpoint; the first three also go to progress.json.
SAVED_PROGRESS = ("epoch", "step_in_epoch", "global_step", "history", "epoch_totals", "starts")


def checkpoint_name(global_step: int, epoch: int | None = None) -> str:
    """The folder name of a checkpoint; an epoch's end gets its own (it may fall on a step's)."""
    return f"{CHECKPOINT_PREFIX}{global_step:08d}" + (f"_epoch{epoch}" if epoch is not None else "")


def write_checkpoint(folder: str, sam: nn.Module, optimizer, scheduler, progress: dict) -> None:
    """Write the training state into `folder` (a local temp folder that Ray Train then uploads)."""
    payload = {
        "hq_state": {k: v.detach().cpu() for k, v in sam.state_dict().items() if is_hq_key(k)},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        **{k: progress[k] for k in SAVED_PROGRESS},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    storage.write_bytes(storage.join(folder, STATE_FILE), buffer.getvalue())
    storage.write_json(
        storage.join(folder, PROGRESS_FILE),
        {k: progress[k] for k in ("epoch", "step_in_epoch", "global_step")},
    )


def read_checkpoint(folder: str) -> dict:
    """The training state saved in a checkpoint folder (local or a URI)."""
    data = storage.read_bytes(storage.join(folder, STATE_FILE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def restore_checkpoint(folder: str, sam: nn.Module, optimizer, scheduler) -> dict:
    """Load a checkpoint's HQ head, optimizer and scheduler; returns its saved progress."""
    saved = read_checkpoint(folder)
    missing = sam.load_state_dict(saved["hq_state"], strict=False)
    if missing.unexpected_keys or any(is_hq_key(k) for k in missing.missing_keys):
        raise RuntimeError("the checkpoint's HQ head does not fit this model")
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return {k: saved[k] for k in SAVED_PROGRESS if k in saved}


def latest_checkpoint(out: str) -> str:
    """URI of the checkpoint folder in OUT with the highest step."""
    best, best_step = None, (-1, -1)
    for folder in storage.list_folder(out.rstrip("/")):
        if not posixpath.basename(folder).startswith(CHECKPOINT_PREFIX):
            continue
        try:
            progress = storage.read_json(storage.join(folder, PROGRESS_FILE))
            step = (progress["global_step"], progress["epoch"])
        except (OSError, ValueError, KeyError):
            continue  # not complete (Ray Train writes it last), or not ours
        if step > best_step:
            best, best_step = folder, step
    if best is None:
        raise TrainError(f"{out} holds no complete checkpoint of `hqsam train`")
    return best


def export_run(
    out: str, checkpoint: str | None = None, *, base: tuple[str, str | None] | None = None
) -> dict:
    """Write OUT/hq_head.pth, OUT/model.pth and OUT/metrics.json from a checkpoint folder of OUT
    (default: the latest); returns the summary written to metrics.json.

    `base` is the run's (checkpoint, hq_head) as given: the recorded ones are redacted URLs, which
    serve `hqsam export` only when they carry no credentials."""
    out = out.rstrip("/")
    config = read_config(out)
    checkpoint = checkpoint or latest_checkpoint(out)
    state = read_checkpoint(checkpoint)
    base_checkpoint, base_hq_head = base or (config["checkpoint"], config["hq_head"])
    model = load_base(config["model"], base_checkpoint, base_hq_head)
    expected = {k for k in model.state_dict() if is_hq_key(k)}
    if set(state["hq_state"]) != expected:
        raise TrainError(f"{checkpoint} does not hold the HQ head of a {config['model']} model")
    model.load_state_dict(state["hq_state"], strict=False)
    save_hq_head(model, f"{out}/hq_head.pth")
    save_model(model, f"{out}/model.pth")
    summary = {
        "model": config["model"],
        "base_checkpoint": config["checkpoint"],
        "hq_head_init": config["hq_head"],
        "global_step": state["global_step"],
        "epochs_completed": state["epoch"],
        "checkpoint": checkpoint,
        "epochs": state["history"],
        "starts": state.get("starts", []),
        "hq_head": f"{out}/hq_head.pth",
        "full_model": f"{out}/model.pth",
        "config": {k: v for k, v in config.items() if k != "started"},
    }
    storage.write_json(f"{out}/metrics.json", summary)
    return summary
