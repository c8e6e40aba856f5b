"""Reader of a refine run's OUT: the complete Parquet parts of its rows folder (one row per input
annotation).

OUT's refined rows live in their own folder, OUT/rows/, so that every Parquet reader (pandas, pyarrow,
DuckDB, polars, Spark, Ray Data) reads them by pointing at that one folder: the JSON sidecars
(summary.json, annotations.json, the run's records) stay in OUT beside it.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from hqsam.hqsam_core import storage
from hqsam.schemas.refined import REFINED_ANNOTATION

ROWS_FOLDER = "rows"  # OUT/rows/part-*.parquet: the one place the folder's name is spelled
PART_PREFIX = "part-"
PART_PATTERN = f"{PART_PREFIX}*.parquet"
# The parts pipeline/write_leftovers.py writes for rows it could not refine (status worker_crashed):
# named apart so that a resume removes them and refines their rows again. Still part-*.parquet.
CRASHED_PART_PREFIX = f"{PART_PREFIX}crashed-"
CRASHED_PART_PATTERN = f"{CRASHED_PART_PREFIX}*.parquet"


def rows_folder(out: str) -> str:
    """The folder of OUT's refined rows (its Parquet part files and nothing else)."""
    return storage.join(out.rstrip("/"), ROWS_FOLDER)


def part_files(out: str) -> list[str]:
    """URIs of the complete part files of OUT (in OUT/rows/)."""
    return storage.list_files(rows_folder(out), PART_PATTERN)


def old_layout_parts(out: str) -> list[str]:
    """Part files directly in OUT, where hqsam wrote them before OUT/rows/ existed."""
    return storage.list_files(out, PART_PATTERN)


def refined_parts(uri: str) -> list[str]:
    """The part files of a refine output given as OUT, as OUT/rows itself, or as an OUT of the old
    layout (parts directly in it): for readers of a finished output (review, apply, train, evaluate)."""
    return part_files(uri) or storage.list_files(uri, PART_PATTERN)


def with_columns(table: pa.Table, columns: list[str]) -> pa.Table:
    """`table` with `columns` in that order; one that a part written before the column existed
    lacks (`prompt`, `stability`, `accepted`, ...) comes as nulls of its declared type, so that an
    older OUT reads like a new one whose rows have no such value."""
    for name in columns:
        if name not in table.column_names:
            declared = REFINED_ANNOTATION.field(name)
            table = table.append_column(declared, pa.nulls(table.num_rows, declared.type))
    return table.select(columns)


def present(schema: pa.Schema, columns: list[str]) -> list[str]:
    """The `columns` that a part of this schema holds (pyarrow refuses to read absent ones)."""
    return [name for name in columns if name in schema.names]


def read_part_files(uris: list[str], columns: list[str], filters=None) -> pa.Table:
    """The given columns of these part files, as one table (`filters` as pq.read_table takes them);
    columns a part lacks are null."""
    tables = []
    for uri in uris:
        fs, path = storage.url_to_fs(uri)
        schema = pq.read_schema(path, filesystem=fs)
        table = pq.read_table(path, columns=present(schema, columns), filesystem=fs, filters=filters)
        tables.append(with_columns(table, columns))
    if not tables:
        return REFINED_ANNOTATION.empty_table().select(columns)
    return pa.concat_tables(tables)
