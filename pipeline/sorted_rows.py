"""OUT's rows in input order, merged from its parts a row group at a time.

pipeline/write_parquet.py writes each part sorted by `ann_index` and says so in the Parquet footer
(`sorting_columns`), so the parts merge like the runs of a merge sort, in Arrow, with about one
row group per part in memory. A part without that declaration (written before parts were sorted)
is read whole and sorted; a part holds at most `images_per_file` images. An open part still costs
memory (about 0.3 MB), so more than FAN_IN parts are first merged FAN_IN at a time into local
sorted files, and those again, until at most FAN_IN remain.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hqsam.hqsam_core import storage
from hqsam.pipeline.read_refined import present, read_part_files, with_columns

SORT_KEY = "ann_index"
FAN_IN = 64  # parts open at once
ROW_GROUP_ROWS = 1024  # what the merge reads of a part at a time (one row group)
PYTHON_ROWS = 256  # rows turned into Python objects at a time
READ_BUFFER = 2**14  # per column of an open part


def sorted_part_options(schema) -> dict:
    """`pq.write_table` options of a part sorted by `ann_index`: the footer says so, and small row
    groups keep what each part's reader holds during the merge small."""
    ordering = pq.SortingColumn.from_ordering(schema, [(SORT_KEY, "ascending")])
    return {"sorting_columns": ordering, "row_group_size": ROW_GROUP_ROWS}


def rows_by_position(uris: list[str], columns: list[str]) -> Iterator[dict]:
    """Every row of these parts as a dict, by `ann_index`. The merge is stable: rows at one
    position come in the order of `uris`, then of the rows in their part (the order in which
    the parts' tables, concatenated, hold them)."""
    with tempfile.TemporaryDirectory(prefix="hqsam-merge-") as spill:
        uris = _fewer_runs(uris, columns, Path(spill))
        for table in _merged([_part_batches(uri, columns) for uri in uris]):
            for batch in table.to_batches(PYTHON_ROWS):
                yield from batch.to_pylist()


def image_ids(uris: list[str]) -> np.ndarray:
    """The distinct image ids of these parts' rows, sorted."""
    ids = [np.unique(read_part_files([uri], ["image_id"])["image_id"].to_numpy()) for uri in uris]
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def _fewer_runs(uris: list[str], columns: list[str], spill: Path) -> list[str]:
    """Files holding the rows of `uris`, at most FAN_IN of them, in an order that keeps the merge
    stable: each merges a consecutive group, and a group's rows keep their order in it."""
    level = 0
    while len(uris) > FAN_IN:
        groups = [uris[start : start + FAN_IN] for start in range(0, len(uris), FAN_IN)]
        uris = [_merge_into(group, columns, spill / f"{level}-{k}.parquet") for k, group in enumerate(groups)]
        level += 1
    return uris


def _merge_into(uris: list[str], columns: list[str], path: Path) -> str:
    writer = None
    for table in _merged([_part_batches(uri, columns) for uri in uris]):
        if writer is None:
            ordering = sorted_part_options(table.schema)["sorting_columns"]
            writer = pq.ParquetWriter(path, table.schema, sorting_columns=ordering, compression="lz4")
        writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
    if writer is None:  # no rows at all
        return uris[0]
    writer.close()
    return str(path)


class _Run:
    """A sorted stream of tables, and the rows of it read but not yet merged."""

    def __init__(self, tables: Iterator[pa.Table]) -> None:
        self.tables, self.done = tables, False
        self.held: list[pa.Table] = []
        self.keys = np.zeros(0, np.int64)

    def pull(self) -> None:
        """Read the next table, or learn there is none."""
        table = next(self.tables, None)
        if table is None:
            self.done = True
        elif table.num_rows:
            self.held.append(table)
            self.keys = np.concatenate([self.keys, table[SORT_KEY].to_numpy()])

    def take_below(self, bound: int | None) -> pa.Table | None:
        """The held rows before `bound` (all when None), no longer held."""
        count = len(self.keys) if bound is None else int(np.searchsorted(self.keys, bound))
        if not count:
            return None
        held = pa.concat_tables(self.held) if len(self.held) > 1 else self.held[0]
        self.held = [held.slice(count)] if count < held.num_rows else []
        self.keys = self.keys[count:]
        return held.slice(0, count)


def _merged(sources: list[Iterator[pa.Table]]) -> Iterator[pa.Table]:
    """The rows of these sorted sources, sorted, a table at a time. Rows at one position come in
    source order, then in their source's order. Rows before the least last key held by an
    unfinished source are final: every row to come lies at or after it."""
    runs = [_Run(source) for source in sources]
    while True:
        for run in runs:
            while not run.done and not len(run.keys):
                run.pull()
        open_runs = [run for run in runs if not run.done]
        bound = min(int(run.keys[-1]) for run in open_runs) if open_runs else None
        taken = [table for run in runs if (table := run.take_below(bound)) is not None]
        if taken:
            table = pa.concat_tables(taken) if len(taken) > 1 else taken[0]
            yield table.take(pc.sort_indices(table[SORT_KEY])) if len(taken) > 1 else table
        if bound is None:
            return
        for run in open_runs:
            if int(run.keys[-1]) == bound:
                run.pull()


def _part_batches(uri: str, columns: list[str]) -> Iterator[pa.Table]:
    fs, path = storage.url_to_fs(uri)
    with fs.open(path, "rb") as handle:
        part = pq.ParquetFile(handle, buffer_size=READ_BUFFER, pre_buffer=False)
        held = present(part.schema_arrow, columns)  # a part older than a column reads it as nulls
        if _declared_sorted(part.metadata):  # a row group at a time: no reader state held between
            for group in range(part.num_row_groups):
                yield with_columns(part.read_row_group(group, columns=held, use_threads=False), columns)
        else:
            table = with_columns(part.read(columns=held, use_threads=False), columns)
            yield table.take(pc.sort_indices(table[SORT_KEY]))  # stable: equal positions keep their order


def _declared_sorted(metadata: pq.FileMetaData) -> bool:
    """Every row group declares ascending `ann_index`, and the groups follow one another."""
    schema = metadata.schema.to_arrow_schema()
    groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
    wanted = ((SORT_KEY, "ascending"),)
    for group in groups:
        ordering, _ = pq.SortingColumn.to_ordering(schema, group.sorting_columns or ())
        if tuple(ordering[:1]) != wanted:
            return False
    leaf = [metadata.schema.column(j).path for j in range(metadata.num_columns)].index(SORT_KEY)
    bounds = [group.column(leaf).statistics for group in groups if group.num_rows]
    if not all(bound is not None and bound.has_min_max for bound in bounds):
        return False
    return all(before.max <= after.min for before, after in zip(bounds, bounds[1:]))
