"""Source: the run's input as a task folder (pipeline/stream_coco.py) that Ray Data reads part by part.

`hqsam refine IN.json` streams its input into a local staging folder before OUT is touched (what
the input gets refused for is refused then), and publishes it as OUT/_hqsam_tasks/ once OUT is
claimed: every node of a cluster reads it there, and a --resume of the same job reuses it instead
of reading the input again. A task folder given as the input (`hqsam manifest`) is read in place.
The driver holds the folder's record (counts, part names), never its rows.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError
from hqsam.pipeline.manifest import ManifestError
from hqsam.pipeline.stream_coco import TASKS_RECORD, StreamedManifest, read_task_folder, stream_coco
from hqsam.schemas.refine_rows import IMAGE_TASK

log = logging.getLogger(__name__)

TASKS_FOLDER = "_hqsam_tasks"  # in OUT; "_hqsam_" names are bookkeeping to pipeline/out_folder.py
MIB = 2**20


class TaskFolderLimitError(HqsamError):
    """--limit with a task folder as the input: the folder was made with its own limit."""


def tasks_folder(out: str) -> str:
    return storage.join(out.rstrip("/"), TASKS_FOLDER)


def check_input(uri: str) -> None:
    """ManifestError when there is no annotation file (or task folder) at `uri`."""
    if not storage.exists(uri):
        raise ManifestError(f"annotation file {storage.redact(uri)} does not exist")


def read_tasks(
    annotations: str,
    images: str | None,
    limit: int | None,
    staging: str,
    *,
    reuse_from: str | None = None,
    progress: bool = True,
) -> StreamedManifest:
    """The task folder of the input: the input itself when it is one; with `reuse_from` (an OUT
    being resumed) the one published there for the same --limit; else `annotations` streamed into
    the local folder `staging`."""
    given = read_task_folder(annotations)
    if given is not None:
        if limit is not None:
            raise TaskFolderLimitError(
                f"{storage.redact(annotations)} is a task folder (hqsam manifest), which --limit cannot "
                "cut; make one of the first N images with hqsam manifest --limit N"
            )
        return given
    if reuse_from is not None:
        published = read_task_folder(tasks_folder(reuse_from))
        if published is not None and published.limit == limit:
            log.info("reusing the task rows in %s", storage.redact(tasks_folder(reuse_from)))
            return published
    return stream_with_progress(annotations, staging, images, limit, progress)


def stream_with_progress(
    annotations: str,
    folder: str,
    images: str | None,
    limit: int | None,
    enabled: bool,
    label: str = "reading",
) -> StreamedManifest:
    """`stream_coco` with a progress bar in MiB read."""
    from hqsam.pipeline.progress import ProgressReporter

    fs, path = storage.url_to_fs(annotations)
    size = 0
    if fs.exists(path):
        size = fs.du(path) if fs.isdir(path) else fs.size(path)
    with ProgressReporter(label, total=-(-size // MIB), unit="MiB", enabled=enabled) as bar:
        counter = MibCounter(bar)
        tasks = stream_coco(annotations, folder, images, progress=counter, limit=limit)
        counter.finish()  # the last part of a MiB, or a file of less than one, is read too
        return tasks


class MibCounter:
    """Bytes read, advanced on the reporter a whole MiB at a time (never past its total)."""

    def __init__(self, bar) -> None:
        self.bar, self.bytes, self.shown = bar, 0, 0

    def __call__(self, count: int) -> None:
        self.bytes += count
        whole = min(self.bytes // MIB, self.bar.total or 0)
        if whole > self.shown:
            self.bar.advance(whole - self.shown)
            self.shown = whole

    def finish(self) -> None:
        if self.bar.total and self.bar.total > self.shown:
            self.bar.advance(self.bar.total - self.shown)
            self.shown = self.bar.total


def publish(tasks: StreamedManifest, staging: str, out: str) -> StreamedManifest:
    """The task folder where every worker reads it: one streamed into `staging` goes to
    OUT/_hqsam_tasks/ (replacing whatever an earlier run left there; the record last); any other
    (the input's own, or OUT's reused) stays where it is."""
    if not storage.exists(storage.join(staging, TASKS_RECORD)):
        return tasks
    target = tasks_folder(out)
    storage.remove(target)
    storage.make_folder(target)
    for part in tasks.parts:
        storage.move_file(storage.url_to_fs(part)[1], storage.join(target, part.rsplit("/", 1)[-1]))
    storage.write_json(storage.join(target, TASKS_RECORD), tasks.record())
    return StreamedManifest.from_record(tasks.record(), target)


def discard_published(out: str) -> None:
    """Remove OUT/_hqsam_tasks/ once every annotation has its row (nothing is left to resume)."""
    storage.remove(tasks_folder(out))


def task_dataset(tasks: StreamedManifest, written=None):
    """The task rows as a Ray dataset of one block per part, each part read by a Ray task; without
    the rows whose first annotation is marked in `written` (packed bits by position, or an ObjectRef
    of them: pipeline/out_tally.py). One block per part, not Ray's Parquet reader, which merges small
    files into one block: blocks are what spreads the work over the refine actors."""
    import ray

    from hqsam.pipeline.stage import map_tasks

    parts = ray.data.from_items(
        [{"part": part} for part in tasks.parts], override_num_blocks=len(tasks.parts)
    )
    return map_tasks(
        parts, read_task_parts, fn_kwargs={"written": written}, batch_format="pyarrow", batch_size=None
    )


def read_task_parts(batch: pa.Table, written=None) -> pa.Table:
    """The task rows of the part files named in `batch`, less the rows marked in `written`."""
    tables = []
    for uri in batch["part"].to_pylist():
        fs, path = storage.url_to_fs(uri)
        tables.append(pq.read_table(path, filesystem=fs, schema=IMAGE_TASK))
    tasks = pa.concat_tables(tables)
    return tasks if written is None else drop_written(tasks, written)


def drop_written(batch: pa.Table, written) -> pa.Table:
    """The task rows of `batch` whose first annotation is not marked in `written`."""
    import ray

    bits = ray.get(written) if isinstance(written, ray.ObjectRef) else written
    return batch.filter(pa.array(~is_marked(bits, first_positions(batch))))


def first_positions(tasks: pa.Table) -> np.ndarray:
    """Each task row's first annotation position: what names the row."""
    return pc.list_element(tasks["ann_indices"], 0).to_numpy()


def is_marked(bits: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Whether each position is set in `bits` (np.packbits(..., bitorder="little")); positions
    beyond them are not."""
    positions = np.asarray(positions, np.int64)
    inside = positions < len(bits) * 8
    marked = np.zeros(len(positions), bool)
    inner = positions[inside]
    marked[inside] = (bits[inner >> 3] >> (inner & 7)) & 1 == 1
    return marked
