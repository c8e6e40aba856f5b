"""What every command shares: typed choices, the model/checkpoint/device options, and error handling.

Declared once here; each command module in `jobs/` uses them. This is the only module that job
modules import from `jobs/`.
"""

from __future__ import annotations

import enum

import typer
from typer.core import TyperGroup

from hqsam.hqsam_core.errors import HqsamError
from hqsam.hqsam_core.variants import VARIANTS, default_checkpoint

Variant = enum.Enum("Variant", {name: name for name in VARIANTS}, type=str)
Variant.__doc__ = "A model variant (hqsam_core.variants.VARIANTS)."
Variant.__str__ = lambda self: self.value


class Device(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


MODEL_OPTION = typer.Option(Variant("vit_tiny"), "--model", help="Model variant.")
CHECKPOINT_OPTION = typer.Option(
    None,
    "--checkpoint",
    help="Weights: a path, an fsspec URI (s3://, gs://, https://) or a zoo name such as "
    "sam_hq_vit_tiny. Default: the official HQ-SAM file of --model, downloaded once into $HQSAM_CACHE.",
)
HQ_HEAD_OPTION = typer.Option(
    None, "--hq-head", help="HQ head file to combine with a plain SAM checkpoint (e.g. a run's hq_head.pth)."
)
DEVICE_OPTION = typer.Option(None, "--device", help="Where the model runs (default: cuda when present).")
ADDRESS_HELP = (
    "Run as a job on this Ray cluster instead of here: the dashboard URL (http://HEAD:8265) or a "
    "Ray address. Logs are followed until the job ends; the exit code is the job's."
)
ADDRESS_OPTION = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP)
DETACH_OPTION = typer.Option(
    False, "--detach", help="With --address: print the job id and return at once (see `hqsam jobs`)."
)
FORWARD_ENV_OPTION = typer.Option(
    [],
    "--forward-env",
    help="With --address: copy this local environment variable into the job (e.g. AWS_ENDPOINT_URL); "
    "repeatable. Values are never printed.",
)
PROGRESS_OPTION = typer.Option(True, "--progress/--no-progress", help="Show progress.")


def checkpoint_or_default(checkpoint: str | None, model: Variant) -> str:
    """The --checkpoint given, or the official HQ-SAM zoo entry of the variant."""
    return checkpoint or default_checkpoint(model.value)


def device_or_default(device: Device | None) -> str:
    """The --device given, or cuda when this machine has a GPU."""
    if device is not None:
        return device.value
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` and exit with `code` (2: the user's mistake)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


class HqsamGroup(TyperGroup):
    """The `hqsam` command group: an HqsamError or a bad option value of any command ends as one
    `error:` line and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HqsamError as error:
            fail(str(error), error.exit_code)
        except typer.BadParameter as error:  # a bad choice or value: one line too, not a usage box
            fail(error.format_message())
