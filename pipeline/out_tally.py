"""What OUT holds of a run's task rows, counted by a Ray worker, never by the driver.

One pass over the task parts (which annotation positions belong to the run) and one over OUT's
rows (ann_index and status only) give: the annotations written once, their statuses, the rows
written more than once, and the task rows still without rows (with their images and annotations).
Memory is one bit per annotation of the input, twice, in the worker. The marks of what is written
stay in Ray's object store, where the source's filter (pipeline/task_source.py) reads them.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.acceptance import summary_counts
from hqsam.pipeline.read_refined import part_files
from hqsam.pipeline.stream_coco import StreamedManifest
from hqsam.pipeline.task_source import first_positions
from hqsam.schemas.refined import REFINED_ANNOTATION

VERDICT_COLUMNS = ("category_id", "accepted", "rejected_by")


@dataclass
class OutTally:
    written: int = 0  # annotations of the run with at least one row in OUT
    statuses: dict[str, int] = field(default_factory=dict)  # of each written annotation's first row
    repeated: int = 0  # rows beyond the first of an annotation
    unwritten_rows: int = 0  # task rows none of whose annotations is in OUT yet
    unwritten_annotations: int = 0
    unwritten_images: int = 0
    # the acceptance policy's verdicts on the written ok annotations (hqsam_core/acceptance.py)
    accepted: int = 0
    rejected: int = 0
    rejected_by_clause: dict[str, int] = field(default_factory=dict)
    by_category: dict[str, dict[str, int]] = field(default_factory=dict)

    def add_verdicts(self, rows: pa.Table) -> None:
        """Count the verdicts of these rows (category_id, accepted, rejected_by); unjudged rows
        (not ok, or written before the policy existed) count in neither."""
        judged = rows.filter(pc.is_valid(rows["accepted"]))
        if not judged.num_rows:
            return
        counts = summary_counts(
            judged["accepted"].to_numpy(zero_copy_only=False),
            judged["rejected_by"].to_pylist(),
            judged["category_id"].to_pylist(),
        )
        self.accepted += counts["accepted"]
        self.rejected += counts["rejected"]
        _add(self.rejected_by_clause, counts["rejected_by_clause"])
        for category, verdicts in counts["by_category"].items():
            _add(self.by_category.setdefault(category, {"accepted": 0, "rejected": 0}), verdicts)

    @classmethod
    def nothing_written(cls, tasks: StreamedManifest) -> OutTally:
        """The tally of an OUT without rows, known without reading anything."""
        return cls(
            unwritten_rows=tasks.rows,
            unwritten_annotations=tasks.annotations,
            unwritten_images=tasks.images,
        )


def tally_out(tasks: StreamedManifest, out: str):
    """(OutTally, an ObjectRef of the packed marks of written positions), counted by a Ray task."""
    import ray

    count = ray.remote(num_cpus=1, max_retries=2)(count_out).options(num_returns=2)
    tally, written = count.remote(tasks.parts, out, tasks.positions)
    return ray.get(tally), written


def count_out(parts: list[str], out: str, positions: int) -> tuple[OutTally, np.ndarray]:
    """The tally of OUT against the task parts, and np.packbits(written, bitorder="little")."""
    member = np.zeros(positions, bool)
    for part in parts:
        member[_read(part, ["ann_indices"])["ann_indices"].combine_chunks().flatten().to_numpy()] = True
    written = np.zeros(positions, bool)
    statuses: Counter = Counter()
    repeated = 0
    verdicts = OutTally()
    for part in part_files(out):
        rows = _read(part, ["ann_index", "status", *VERDICT_COLUMNS])
        index = rows["ann_index"].to_numpy()
        ours = (index >= 0) & (index < positions)
        ours[ours] = member[index[ours]]
        index, rows = index[ours], rows.filter(pa.array(ours))
        unique, first = np.unique(index, return_index=True)
        fresh = first[~written[unique]]
        repeated += len(index) - len(fresh)
        firsts = rows.take(pa.array(fresh))
        statuses.update(firsts["status"].to_pylist())
        verdicts.add_verdicts(firsts.select(list(VERDICT_COLUMNS)))
        written[index[fresh]] = True
    tally = dataclasses.replace(
        verdicts, written=int(written.sum()), statuses=dict(sorted(statuses.items())), repeated=repeated
    )
    for part in parts:
        _count_unwritten(_read(part, ["image_id", "ann_indices"]), written, tally)
    return tally, np.packbits(written, bitorder="little")


def _count_unwritten(tasks: pa.Table, written: np.ndarray, tally: OutTally) -> None:
    """Add the task rows of one part that have no rows in OUT (an image's rows are in one part)."""
    missing = ~written[first_positions(tasks)]
    if not missing.any():
        return
    rows = tasks.filter(pa.array(missing))
    tally.unwritten_rows += rows.num_rows
    tally.unwritten_annotations += pc.sum(pc.list_value_length(rows["ann_indices"])).as_py() or 0
    tally.unwritten_images += pc.count_distinct(rows["image_id"]).as_py()


def _read(uri: str, columns: list[str]) -> pa.Table:
    """The columns of a Parquet file; those a part written before they existed lacks, as nulls."""
    fs, path = storage.url_to_fs(uri)
    with fs.open(path, "rb") as file:
        parquet = pq.ParquetFile(file)
        present = [name for name in columns if name in parquet.schema_arrow.names]
        table = parquet.read(columns=present)
    for name in columns:
        if name not in present:
            table = table.append_column(
                REFINED_ANNOTATION.field(name), pa.nulls(table.num_rows, REFINED_ANNOTATION.field(name).type)
            )
    return table.select(columns)


def _add(total: dict[str, int], counts: dict[str, int]) -> None:
    for key, n in counts.items():
        total[key] = total.get(key, 0) + n
