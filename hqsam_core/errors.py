"""The one error base of hqsam: every error a user can act on is an HqsamError with a one-sentence
message; the CLI catches this base once (exit 2 for a user error, 1 for a failed run)."""

from __future__ import annotations


class HqsamError(Exception):
    """A problem the user can act on; `str(error)` is one sentence saying what and what to do."""

    exit_code = 2  # the CLI's exit status: 2 for a user error


class RunFailedError(HqsamError):
    """The run started and failed as a whole (not a single row)."""

    exit_code = 1


def one_line(error: BaseException) -> str:
    """An exception as a short single line for an `error` column or a log line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
