"""What every command shares: typed choices, the model/checkpoint/device options, and error handling.

Declared once here; each command module in `jobs/` uses them. This is the only module that job
modules import from `jobs/`.
"""

from __future__ import annotations

import enum

import typer
from typer.core import TyperCommand, TyperGroup

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


def _sha256_or_none(value: str | None) -> str | None:
    if value is None:
        return None
    from hqsam.hqsam_core.zoo import CheckpointSourceError, checked_sha256

    try:
        return checked_sha256(value, "--checkpoint-sha256")
    except CheckpointSourceError as error:
        raise typer.BadParameter(str(error)) from None


CHECKPOINT_SHA256_OPTION = typer.Option(
    None,
    "--checkpoint-sha256",
    metavar="HEX",
    callback=_sha256_or_none,
    help="Refuse the --checkpoint file unless its sha256 is HEX (printed at its first download). "
    "Zoo files can also be pinned by name with HQSAM_ZOO_SHA256=NAME=HEX,...; any source, --hq-head "
    "included, by appending #sha256=HEX to it.",
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


def _show_ray_logs(verbose: bool) -> bool:
    if verbose:
        from hqsam.pipeline.console import configure

        configure(verbose=True)
    return verbose


VERBOSE_OPTION = typer.Option(
    False,
    "-v",
    "--verbose",
    callback=_show_ray_logs,
    help="Also show Ray's logs (by default they stay in Ray's log folder, printed on failure).",
)


def checkpoint_or_default(checkpoint: str | None, model: Variant, sha256: str | None = None) -> str:
    """The --checkpoint given, or the official HQ-SAM zoo entry of the variant; pinned to
    --checkpoint-sha256 when given (`SOURCE#sha256=HEX`, checked wherever the file is fetched)."""
    source = checkpoint or default_checkpoint(model.value)
    if sha256 is None:
        return source
    from hqsam.hqsam_core.zoo import pinned

    return pinned(source, sha256)


def device_or_default(device: Device | None) -> str:
    """The --device given, or cuda when this machine has a GPU."""
    if device is not None:
        return device.value
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


REFINED_OUT_ARGUMENT = typer.Argument(..., help="The --out of `hqsam refine` (local, s3://, gs://).")


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` and exit with `code` (2: the user's mistake)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


# Help is laid out by click's plain formatter (Typer(rich_markup_mode=None)): it wraps text to the
# terminal, where Rich's panels cut option names, defaults and sentences with "…" at 80 columns.
_GLUED_HYPHEN = "\u2011"  # a non-breaking hyphen stands in for "-" while help text is wrapped


class _WholeWordsFormatter(typer.Context.formatter_class):
    """click's help formatter, never breaking a line inside a hyphenated word (--hq-token-only)."""

    def write_text(self, text: str) -> None:
        super().write_text(text.replace("-", _GLUED_HYPHEN))

    def write_dl(self, rows, *args, **kwargs) -> None:
        glued = [(first, second.replace("-", _GLUED_HYPHEN)) for first, second in rows]
        super().write_dl(glued, *args, **kwargs)

    def getvalue(self) -> str:
        return super().getvalue().replace(_GLUED_HYPHEN, "-")


class _HelpContext(typer.Context):
    formatter_class = _WholeWordsFormatter


class _WholeHelp:
    """Help that reads whole at any width: a command listed in its group shows its docstring's first
    paragraph in full (wrapped), not cut to 45 characters with "..."."""

    context_class = _HelpContext

    def get_short_help_str(self, limit: int = 45) -> str:
        if self.short_help or not self.help:
            return super().get_short_help_str(limit)
        return " ".join(self.help.split("\n\n")[0].split())


class HqsamCommand(_WholeHelp, TyperCommand):
    """An hqsam command: values shown by name (--out OUT) or choice (<cpu|cuda>) instead of by Python
    type (<str>, <int range>), and arguments in capitals without braces."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        self._name_values(ctx)  # before parsing: --help and "Missing argument 'OUT'" use the names
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter) -> None:
        self._name_values(ctx)
        super().format_help(ctx, formatter)

    def _name_values(self, ctx) -> None:
        for param in self.params:
            if param.metavar is None and not getattr(param, "is_flag", False):
                if param.param_type_name == "argument" or "|" not in param.display_type(ctx):
                    param.metavar = param.name.upper()

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [piece.strip("{}") for piece in super().collect_usage_pieces(ctx)]  # Typer's {REQUIRED}

    def format_options(self, ctx, formatter) -> None:
        params = [param for param in self.get_params(ctx) if not param.hidden]
        arguments = [(p.metavar, p.get_help_record(ctx)[1]) for p in params if p.param_type_name != "option"]
        options = [p.get_help_record(ctx) for p in params if p.param_type_name == "option"]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class HqsamGroup(_WholeHelp, TyperGroup):
    """The `hqsam` command group: an HqsamError or a bad option value of any command ends as one
    `error:` line and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HqsamError as error:
            fail(str(error), error.exit_code)
        except typer.BadParameter as error:  # a bad choice or value: one line too, not a usage box
            fail(error.format_message())
