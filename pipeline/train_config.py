"""The settings of an `hqsam train` run, their checks, and their record in OUT (train_config.json)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError

CONFIG_FILE = "train_config.json"
# Settings that must not change between a run and its resumption: they define what is trained.
RUN_IDENTITY = ("model", "checkpoint", "hq_head")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("cpu", "cuda")


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


def check_config(config: TrainConfig) -> None:
    """Raise TrainError for settings no run can use."""
    if config.workers < 1 or config.batch_size < 1 or config.epochs < 1:
        raise TrainError("--workers, --batch-size and --epochs must be at least 1")
    if config.precision not in PRECISIONS:
        raise TrainError(f"--precision must be fp32 or bf16, not {config.precision!r}")
    if config.device not in DEVICES:
        raise TrainError(f"--device must be cpu or cuda, not {config.device!r}")
    if not config.data:
        raise TrainError("pass at least one --data source")


def config_uri(out: str) -> str:
    return f"{out.rstrip('/')}/{CONFIG_FILE}"


def record_config(config: TrainConfig) -> None:
    """Write OUT/train_config.json, or check that an existing run in OUT trains the same thing."""
    uri = config_uri(config.out)
    current = asdict(config)
    if storage.exists(uri):
        previous = storage.read_json(uri)
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


def read_config(out: str) -> dict:
    """The recorded settings of the run in OUT."""
    try:
        return storage.read_json(config_uri(out))
    except FileNotFoundError:
        raise TrainError(f"{out} is not an `hqsam train` run: it has no {CONFIG_FILE}") from None
