"""The settings of an `hqsam train` run, their checks, and their record in OUT (train_config.json)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError
from hqsam.hqsam_core.version import versions
from hqsam.hqsam_core.zoo import split_pin

CONFIG_FILE = "train_config.json"
# Settings that must not change between a run and its resumption: they define what is trained.
RUN_IDENTITY = ("model", "checkpoint", "hq_head")
# Recorded redacted: a signed or credentialed URL carries its secret.
URI_SETTINGS = ("out", "checkpoint", "hq_head")
URI_LIST_SETTINGS = ("data", "val")
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
    """Write OUT/train_config.json, or check that an existing run in OUT trains the same thing.

    URIs are recorded redacted (storage.redact): the record never holds a credential or signature."""
    uri = config_uri(config.out)
    current = recorded(config)
    if storage.exists(uri):
        previous = storage.read_json(uri)
        changed = [key for key in RUN_IDENTITY if not _same_source(previous.get(key), current.get(key))]
        if changed:
            raise TrainError(
                f"{storage.redact(config.out)} holds a run with another {changed[0]} ({previous.get(changed[0])!r}); "
                "pass a new --out or the same settings to resume it"
            )
        current["started"] = previous.get("started")
    else:
        current["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    current["versions"] = versions()
    storage.write_json(uri, current)


def recorded(config: TrainConfig) -> dict:
    """The settings as train_config.json records them: every URI redacted."""
    record = asdict(config)
    for key in URI_SETTINGS:
        record[key] = storage.redact(record[key])
    for key in URI_LIST_SETTINGS:  # SOURCE::options: the options are no part of the URI
        record[key] = [_redact_source(text) for text in record[key]]
    return record


def _redact_source(text: str) -> str:
    uri, separator, options = text.partition("::")
    return storage.redact(uri) + separator + options


def _same_source(previous, current) -> bool:
    """Whether two recorded values name the same thing; a sha256 pin added or dropped on resuming
    keeps the source (the pin is checked where the file is fetched), two different pins do not."""
    if previous == current or not (isinstance(previous, str) and isinstance(current, str)):
        return previous == current
    (previous_source, previous_pin), (source, pin) = split_pin(previous), split_pin(current)
    return previous_source == source and None in (previous_pin, pin)


def read_config(out: str) -> dict:
    """The recorded settings of the run in OUT."""
    try:
        return storage.read_json(config_uri(out))
    except FileNotFoundError:
        raise TrainError(
            f"{storage.redact(out)} is not an `hqsam train` run: it has no {CONFIG_FILE}"
        ) from None
