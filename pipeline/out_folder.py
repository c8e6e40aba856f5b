"""OUT's policy: what counts as hqsam's files in OUT, and when an OUT may be written, resumed or cleared."""

from __future__ import annotations

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError
from hqsam.pipeline.read_refined import PART_PREFIX

OUR_OUTPUTS = ("annotations.json", "summary.json")
# What --overwrite removes besides OUR_OUTPUTS: part files and the temp files of killed writers.
OUR_PREFIXES = (PART_PREFIX, f".{PART_PREFIX}", ".annotations.json", ".summary.json")
# The run's lease and identity record (and their temp files): OUT holding only these holds no output.
BOOKKEEPING = ("_hqsam_", "._hqsam_")


class OutputNotEmptyError(HqsamError):
    """OUT already holds files and neither --resume nor --overwrite was given."""


def prepare_out(out: str, *, resume: bool, overwrite: bool) -> None:
    """OUT is made if absent; a non-empty one is resumed, cleared of hqsam's files, or refused."""
    existing = check_out(out, resume=resume, overwrite=overwrite)
    if overwrite:
        for uri in existing:
            if _name(uri).startswith(OUR_PREFIXES) or _name(uri) in OUR_OUTPUTS:
                storage.remove(uri)
    storage.make_folder(out)


def check_out(out: str, *, resume: bool, overwrite: bool) -> list[str]:
    """OUT's entries, bar the run's bookkeeping; OutputNotEmptyError when there are any and neither
    --resume nor --overwrite was given. Creates nothing."""
    existing = [uri for uri in storage.list_folder(out) if not _name(uri).startswith(BOOKKEEPING)]
    if existing and not (resume or overwrite):
        raise OutputNotEmptyError(
            f"{storage.redact(out)} is not empty; pass --resume to continue the run in it or "
            "--overwrite to replace it"
        )
    return existing


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]
