"""Reader of a refine run's OUT: its complete Parquet parts (one row per input annotation)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from hqsam.hqsam_core import storage
from hqsam.schemas.refined import REFINED_ANNOTATION

PART_PREFIX = "part-"


def part_files(out: str) -> list[str]:
    """URIs of the complete part files in OUT."""
    return storage.list_files(out, f"{PART_PREFIX}*.parquet")


def read_parts(out: str, columns: list[str]) -> pa.Table:
    """The given columns of every part file in OUT, as one table."""
    tables = []
    for uri in part_files(out):
        fs, path = storage.url_to_fs(uri)
        tables.append(pq.read_table(path, columns=columns, filesystem=fs))
    if not tables:
        return REFINED_ANNOTATION.empty_table().select(columns)
    return pa.concat_tables(tables)
