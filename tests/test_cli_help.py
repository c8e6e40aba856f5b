"""`--help` of every command reads whole at 80 columns, and `hqsam --version` says which code runs."""

from __future__ import annotations

import platform
import re

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from hqsam.hqsam_core.version import git_revision, hqsam_version, module_version
from hqsam.jobs.cli import app

COMMANDS = [
    [],
    ["refine"],
    ["train"],
    ["export"],
    ["evaluate"],
    ["predict"],
    ["review"],
    ["apply"],
    ["manifest"],
    ["jobs"],
    ["jobs", "list"],
    ["jobs", "status"],
    ["jobs", "logs"],
    ["jobs", "stop"],
]


def render_help(path: list[str]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def command_and_context(path: list[str]):
    """The command at `path`, with a context its help was rendered in (which names its values)."""
    command = get_command(app)
    for name in path:
        command = command.commands[name]
    ctx = typer.Context(command, info_name=path[-1] if path else "hqsam", terminal_width=80)
    command.get_help(ctx)
    return command, ctx


def flat(text: str) -> str:
    return "".join(text.split())


def declared_texts(path: list[str]) -> list[str]:
    """Everything the command declares for its help: docstring paragraphs, each listed subcommand's
    summary, each argument's and option's names and text (with default, range, env var)."""
    command, ctx = command_and_context(path)
    texts = [paragraph for paragraph in (command.help or "").split("\n\n") if paragraph.strip()]
    for subcommand in getattr(command, "commands", {}).values():
        if not subcommand.hidden:
            texts.append(subcommand.help.split("\n\n")[0])
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:  # hidden
            continue
        names = record[0] if param.param_type_name == "option" else param.metavar
        texts += [names, record[1]]
    return texts


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "hqsam")
def test_help_reads_whole_at_80_columns(path: list[str]) -> None:
    output = render_help(path)
    lines = output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in output
    assert not [line for line in lines if re.search(r"\w-$", line)], "a word broken at a hyphen"
    assert "{" not in lines[0] and "<bool>" not in output and "<str>" not in output
    assert not re.search(r"<(int|float)( range)?>|<list\[", output), "a Python type for a value name"

    command, ctx = command_and_context(path)
    for param in command.get_params(ctx):
        if param.param_type_name == "option" and not param.hidden:
            for name in [*param.opts, *param.secondary_opts]:
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", output), name

    remainder = flat(output)
    for text in declared_texts(path):
        assert flat(text) in remainder, f"not shown whole: {text!r}"
        remainder = remainder.replace(flat(text), "", 1)
    assert "..." not in remainder.replace("[ARGS]...", ""), "cut with '...'"


def test_help_names_values_and_arguments_by_what_they_are() -> None:
    refine = render_help(["refine"])
    assert refine.splitlines()[0].endswith("refine [OPTIONS] ANNOTATIONS")
    assert "--out OUT" in refine and "--model <vit_b|vit_l|vit_h|vit_tiny>" in refine
    assert "--hq-token-only / --no-hq-token-only" in refine and "--images-per-file" not in refine
    missing = CliRunner().invoke(app, ["jobs", "stop"], env={"COLUMNS": "80"})
    assert missing.exit_code == 2 and "Missing argument 'JOB_ID'" in missing.output


def test_data_options_describe_only_their_own_suffixes() -> None:
    def data_help(command_name: str) -> str:
        command, ctx = command_and_context([command_name])
        (data,) = [param for param in command.get_params(ctx) if "--data" in param.opts]
        return data.help

    train, evaluate = data_help("train"), data_help("evaluate")
    assert "weight=" in train and "images=" in train and "original=" not in train
    assert "original=" in evaluate and "images=" in evaluate and "weight=" not in evaluate


def test_version_option_prints_the_versions() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith(f"hqsam {hqsam_version()}")
    assert f"torch {module_version('torch')}" in line and f"python {platform.python_version()}" in line
    revision, _ = git_revision()
    if revision:
        assert f"(git {revision[:12]}" in line
