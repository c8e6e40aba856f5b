"""Reader of a refine run's OUT: its complete Parquet parts (one row per input annotation)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
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


def not_yet_written(tasks: pa.Table, out: str) -> pa.Table:
    """The task rows without rows in OUT's part files yet. A part holds whole task rows, and a task
    row is known by its first annotation's position in the input (image ids can repeat, an image
    can be split into several rows)."""
    done = read_parts(out, ["ann_index"])["ann_index"].combine_chunks()
    first = pc.list_element(tasks["ann_indices"], 0)
    return tasks.filter(pc.invert(pc.is_in(first, value_set=done)))
