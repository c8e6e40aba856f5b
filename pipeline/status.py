"""Per-annotation statuses carried through the stages (the codes are listed in schemas.refined)."""

from __future__ import annotations

PENDING = "pending"  # refinable: the refine stage turns it into ok or inference_failed


def one_line(error: BaseException) -> str:
    """An exception as a short single line for the `error` column."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
