"""What a crashed block did not write: every annotation still ends as exactly one row in OUT.

A block whose worker died on every try Ray allows it (pipeline/stage.py) is dropped with all its task
rows, the innocent ones too, and a run that fails as a whole leaves the rows it had not reached. After
the Ray run, the task rows without rows in OUT are refined once more, one per block, when the run went
through (the crash then takes only its own row; that pass is tried again if it fails as a whole);
whatever is still missing is written with
`Status.WORKER_CRASHED` and the error, by the chain's own stages.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from hqsam.hqsam_core.errors import one_line
from hqsam.pipeline.encode_masks import EncodeMasks
from hqsam.pipeline.judge_rows import JudgeRows
from hqsam.pipeline.out_tally import tally_out
from hqsam.pipeline.read_refined import CRASHED_PART_PREFIX
from hqsam.pipeline.refine_masks import nothing_refined
from hqsam.pipeline.refine_pipeline import RefineSettings, refine_stages
from hqsam.pipeline.stage import Row, Stage, apply_ray
from hqsam.pipeline.stream_coco import StreamedManifest
from hqsam.pipeline.task_source import task_dataset
from hqsam.pipeline.write_parquet import WriteParquetParts
from hqsam.schemas.status import Status

log = logging.getLogger(__name__)

# Task rows refined again one by one; more missing than this means the run failed, not one input.
RERUN_AT_MOST = 256
# Tries of that one-by-one pass when it fails as a whole (an actor that could not start, say), not
# block by block.
PASSES = 3
DROPPED = (
    "the worker refining this image died on every try (a native crash, the OOM killer or a lost node); "
    "see the Ray worker logs"
)

Chain = Callable[[str, RefineSettings], list[Stage]]


def write_leftovers(
    tasks: StreamedManifest,
    out: str,
    settings: RefineSettings,
    crash: BaseException | None = None,
    *,
    chain: Chain = refine_stages,
) -> int:
    """After the Ray run over `tasks` (which raised `crash`, if it did): refine the task rows OUT has
    no rows of again, one per block, unless the run failed as a whole, then write a WORKER_CRASHED
    row for every annotation still missing, in Ray tasks. Returns how many annotations were written
    so. `chain` builds the stages of the second pass (the run's own: refine_stages)."""
    import ray

    tally, written = tally_out(tasks, out)
    if tally.unwritten_rows and crash is None and tally.unwritten_rows <= RERUN_AT_MOST:
        log.warning(
            "%d images lost their rows to a crash; refining them again one by one", tally.unwritten_rows
        )
        for _ in range(PASSES):
            missing = pa.concat_tables(ray.get(task_dataset(tasks, written).to_arrow_refs()))
            ran_through = refine_one_by_one(missing, out, settings, chain)
            tally, written = tally_out(tasks, out)
            if ran_through or not tally.unwritten_rows:
                break
    if not tally.unwritten_rows:
        return 0
    error = DROPPED if crash is None else f"the Ray run failed before this row was written: {one_line(crash)}"
    crashed = task_dataset(tasks, written).map_batches(
        write_crashed,
        fn_kwargs={"out": out, "settings": settings, "error": error},
        batch_format="pyarrow",
        batch_size=settings.images_per_file,
    )
    count = sum(int(n) for batch in crashed.iter_batches(batch_size=None) for n in batch["annotations"])
    log.warning(
        "%d annotations of %d task rows written as %s", count, tally.unwritten_rows, Status.WORKER_CRASHED
    )
    return count


def refine_one_by_one(
    tasks: pa.Table, out: str, settings: RefineSettings, chain: Chain = refine_stages
) -> bool:
    """Run the chain over `tasks` with one task row per block, batch and part file, dropping the blocks
    that still fail: a crash then costs only its own row. False when the run failed as a whole."""
    import ray

    alone = dataclasses.replace(settings, batch_size=1, images_per_file=1)
    source = ray.data.from_arrow([tasks.slice(i, 1) for i in range(tasks.num_rows)])
    dataset = apply_ray(source, chain(out, alone), keep_going=True)
    try:
        for _ in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            pass
    except Exception as error:  # whatever it did not write is tried again or written as crashed
        log.warning("the one-by-one pass failed as a whole: %s", one_line(error))
        return False
    return True


def write_crashed(tasks: pa.Table, out: str, settings: RefineSettings, error: str) -> pa.Table:
    """Write a WORKER_CRASHED row with `error` for every annotation of `tasks`, as the chain's sink
    writes a row that was not refined, into parts of their own (CRASHED_PART_PREFIX) that a resume
    removes to refine those rows again. Returns how many annotations it wrote, as a one-row table."""
    rows = [_crashed(task, error) for task in tasks.to_pylist()]
    rows = JudgeRows(settings.accept).process(EncodeMasks().process(rows))
    writer = WriteParquetParts(
        out, settings.model_column, settings.images_per_file, prefix=CRASHED_PART_PREFIX
    )
    for start in range(0, len(rows), settings.images_per_file):
        writer.process(rows[start : start + settings.images_per_file])
    return pa.table({"annotations": [sum(len(task["ann_ids"]) for task in rows)]})


def _crashed(task: Row, error: str) -> Row:
    """A task row as RefineMasks leaves one it did not refine, every annotation WORKER_CRASHED."""
    count = len(task["ann_ids"])
    row = task | {
        "statuses": [Status.WORKER_CRASHED] * count,
        "errors": [error] * count,
        "prompts": np.full((count, 4), np.nan),  # no prompt was given to HQ-SAM
    }
    return nothing_refined(row)
