"""OUT's policy: what counts as hqsam's files in OUT, and when an OUT may be written, resumed or cleared.

OUT holds the refined rows in OUT/rows/ (pipeline/read_refined.py) and hqsam's JSON files beside it.
"""

from __future__ import annotations

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError
from hqsam.pipeline.read_refined import CRASHED_PART_PATTERN, PART_PREFIX, old_layout_parts, rows_folder

OUR_OUTPUTS = ("annotations.json", "summary.json")
# What --overwrite removes besides OUR_OUTPUTS: part files (directly in OUT in the old layout) and
# the temp files of killed writers.
OUR_PREFIXES = (PART_PREFIX, f".{PART_PREFIX}", ".annotations.json", ".summary.json")
# The run's lease and identity record (and their temp files): OUT holding only these holds no output.
BOOKKEEPING = ("_hqsam_", "._hqsam_")


class OutputNotEmptyError(HqsamError):
    """OUT already holds files and neither --resume nor --overwrite was given."""


class OldOutputLayoutError(HqsamError):
    """--resume of an OUT whose part files lie directly in it (written before OUT/rows/ existed)."""


def prepare_out(out: str, *, resume: bool, overwrite: bool) -> None:
    """OUT is made if absent; a non-empty one is resumed, cleared of hqsam's files, or refused.

    A resumed OUT loses the temp files of killed writers and the parts of rows that were written
    without being refined (pipeline/write_leftovers.py), so that those rows are refined again."""
    existing = check_out(out, resume=resume, overwrite=overwrite)
    if overwrite:
        for uri in existing:
            if _name(uri).startswith(OUR_PREFIXES) or _name(uri) in OUR_OUTPUTS:
                storage.remove(uri)
        _remove_in_rows(out, (PART_PREFIX, f".{PART_PREFIX}"))
        if not storage.list_folder(rows_folder(out)):
            storage.remove(rows_folder(out))
    elif resume:
        _remove_in_rows(out, (f".{PART_PREFIX}",))
        for uri in storage.list_files(rows_folder(out), CRASHED_PART_PATTERN):
            storage.remove(uri)
    storage.make_folder(out)


def check_out(out: str, *, resume: bool, overwrite: bool) -> list[str]:
    """OUT's entries, bar the run's bookkeeping; OutputNotEmptyError when there are any and neither
    --resume nor --overwrite was given, OldOutputLayoutError on --resume of an OUT of the old
    layout. Creates nothing."""
    existing = [uri for uri in storage.list_folder(out) if not _name(uri).startswith(BOOKKEEPING)]
    if existing and not (resume or overwrite):
        raise OutputNotEmptyError(
            f"{storage.redact(out)} is not empty; pass --resume to continue the run in it or "
            "--overwrite to replace it"
        )
    if resume and not overwrite and old_layout_parts(out):
        raise OldOutputLayoutError(
            f"{storage.redact(out)} holds part files of an earlier hqsam directly in it, not in "
            f"{storage.redact(rows_folder(out))}/, so it cannot be resumed; pass --overwrite to refine "
            "it again or choose a new --out"
        )
    return existing


def _remove_in_rows(out: str, prefixes: tuple[str, ...]) -> None:
    """Remove the files in OUT/rows/ whose names start with one of `prefixes`."""
    for uri in storage.list_files(rows_folder(out)):
        if _name(uri).startswith(prefixes):
            storage.remove(uri)


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]
