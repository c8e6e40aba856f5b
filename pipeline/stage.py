"""The one protocol of the pipeline's units (readers' stages, stages and writers), and its two runners.

A `Stage` turns a list of rows (dicts) into a list of rows, and declares which fields it reads, adds
and drops (the rows themselves are declared in `schemas/`). The same chain of stages runs

- under Ray Data (`apply_ray`): row stages as tasks, batch stages as `map_batches`, stages that hold a
  model on an actor pool, each with the Ray options it asks for;
- as a plain local loop (`run_local`): one process, no Ray, for unit tests, benchmarks and debugging.

Heavy state (a model) is built in `setup()`, which runs once where the stage runs (on the actor under
Ray), so a stage object itself stays small enough to pickle.

Fault tolerance under Ray (Ray Data's own defaults retry without limit, so one input that kills its
worker, a native crash, would be retried for ever and the run would hang):

- a task whose worker dies (a segfault, the OOM killer, a lost node) is retried TASK_RETRIES times,
  on any node; the lost outputs of finished tasks are rebuilt from their inputs within the same bound;
- an actor whose process or node dies is restarted, on any node, as often as it dies (ACTOR_RESTARTS),
  and the call it was running is retried up to ACTOR_CALL_RETRIES times: once per death, and about
  once a second while the actor's node is lost but not yet known dead, so these must span that
  detection. It is the calls that are bounded, not the restarts: Ray Data's actor pool never
  replaces an actor that is dead for good and waits for it, so a bounded restart budget, used up by
  inputs that each kill the actor on every try, would hang the run;
- with `keep_going`, a block that still fails is dropped and the run goes on; the caller accounts for
  the rows it did not write (pipeline/write_leftovers.py). Without it the run raises.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import numpy as np

Row = dict[str, Any]

TASK_RETRIES = 2  # tries after the first of a task whose worker died
# CPUs a task stage asks for. Ray Data reserves each stage's minimum in upstream order: on a small
# machine (2 cores: tasks of 1 CPU + a CPU refine actor) the sink got none until every image had been
# read and decoded, so nothing was written, and no progress shown, until the end.
TASK_CPUS = 0.5
ACTOR_CALL_RETRIES = 10  # tries after the first of a call on an actor that died or is unreachable
# Restarts of one actor: without bound (see above); an input that kills it costs ACTOR_CALL_RETRIES + 1.
ACTOR_RESTARTS = -1


class Stage:
    """One step of a chain: `process(rows) -> rows`.

    - `reads` / `adds` / `drops`: the fields it needs, the fields it adds and the fields it removes;
    - `batch_size`: None processes row by row; an int gives the stage lists of up to that many rows;
    - `on_actor`: the stage holds state worth keeping between calls (a model): an actor pool under Ray;
    - `whole_blocks`: under Ray, each call gets one block whole instead of waiting for `batch_size`
      rows gathered from several blocks (a sink: the driver hears of rows once they are written).
    """

    reads: ClassVar[tuple[str, ...]] = ()
    adds: ClassVar[tuple[str, ...]] = ()
    drops: ClassVar[tuple[str, ...]] = ()
    batch_size: int | None = None
    on_actor: bool = False
    whole_blocks: bool = False

    def setup(self) -> None:
        """Build heavy state; called once before the first `process`, where the stage runs."""

    def process(self, rows: list[Row]) -> list[Row]:
        raise NotImplementedError

    def ray_options(self) -> dict[str, Any]:
        """Named parameters of Ray Data's map_batches/flat_map (compute, num_cpus, num_gpus, memory)."""
        return {}

    @property
    def name(self) -> str:
        return type(self).__name__


def run_local(rows: Iterable[Row], stages: list[Stage]) -> Iterator[Row]:
    """Run the chain in this process, streaming: each stage sees its rows as soon as they exist."""
    stream: Iterable[Row] = rows
    for stage in stages:
        stage.setup()
        stream = _local(stage, stream)
    return iter(stream)


def _local(stage: Stage, rows: Iterable[Row]) -> Iterator[Row]:
    size = stage.batch_size or 1
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield from stage.process(batch)
            batch = []
    if batch:
        yield from stage.process(batch)


def apply_ray(dataset, stages: list[Stage], *, keep_going: bool = False):
    """`dataset` with the chain appended as Ray Data operators (lazy), retries bounded (see above).

    `keep_going`: a block that fails after its retries is dropped, not fatal: the run goes on and
    the caller accounts for its rows."""
    for stage in stages:
        with _retry_bounds_allowed():
            dataset = _append(dataset, stage, **(retry_options(stage) | stage.ray_options()))
    if keep_going:
        dataset.context.max_errored_blocks = -1  # this dataset's copy of the context, not the driver's
    return dataset


def _append(dataset, stage: Stage, **options):
    if stage.on_actor:
        return dataset.map_batches(
            _BatchOnActor,
            fn_constructor_args=(stage,),
            batch_size=stage.batch_size or 1,
            batch_format="numpy",
            **options,
        )
    if stage.batch_size or stage.whole_blocks:
        batch_size = None if stage.whole_blocks else stage.batch_size
        return dataset.map_batches(_batch_task(stage), batch_size=batch_size, batch_format="numpy", **options)
    return dataset.flat_map(_row_task(stage), **options)


@contextlib.contextmanager
def _retry_bounds_allowed() -> Iterator[None]:
    """Ray 2.60 deprecates passing remote options as extra keyword arguments (`ray_remote_args`),
    but names parameters for resources and scheduling only: `retry_options` has no other way in,
    so its deprecation warning is ours to silence here, and only here. `Stage.ray_options` uses the
    named parameters (compute, num_cpus, num_gpus, memory, ...)."""
    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`ray_remote_args` is deprecated", RayDeprecationWarning)
        yield


def retry_options(stage: Stage | None) -> dict[str, Any]:
    """Ray options bounding the retries of the stage's tasks, or its actors' restarts and calls (of
    a plain task without a stage: `map_tasks`); tasks also get their TASK_CPUS."""
    if stage is not None and stage.on_actor:
        return {"max_restarts": ACTOR_RESTARTS, "max_task_retries": ACTOR_CALL_RETRIES}
    return {"max_retries": TASK_RETRIES, "num_cpus": TASK_CPUS}


def map_tasks(dataset, fn: Callable, **options):
    """`dataset.map_batches(fn, **options)` as Ray tasks with the task stages' retries and CPUs (so
    that Ray Data fuses it with the task stages that follow)."""
    with _retry_bounds_allowed():
        return dataset.map_batches(fn, **(retry_options(None) | options))


class _BatchOnActor:
    """Ray Data actor UDF: builds the stage once per actor, then runs it on each numpy batch."""

    def __init__(self, stage: Stage) -> None:
        stage.setup()
        self.stage = stage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return to_batch(self.stage.process(to_rows(batch)))


def _batch_task(stage: Stage) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    ready = []

    def run(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not ready:
            stage.setup()
            ready.append(True)
        return to_batch(stage.process(to_rows(batch)))

    run.__name__ = stage.name
    return run


def _row_task(stage: Stage) -> Callable[[Row], list[Row]]:
    ready = []

    def run(row: Row) -> list[Row]:
        if not ready:
            stage.setup()
            ready.append(True)
        return stage.process([row])

    run.__name__ = stage.name  # how the operator is named in Ray's plan and progress
    return run


def to_rows(batch: dict[str, np.ndarray]) -> list[Row]:
    """A Ray Data numpy batch (columns) -> rows."""
    columns = list(batch)
    count = len(batch[columns[0]]) if columns else 0
    return [{name: batch[name][i] for name in columns} for i in range(count)]


def to_batch(rows: list[Row]) -> dict[str, np.ndarray]:
    """Rows -> a numpy batch; lists, arrays of differing shapes and text become object columns."""
    if not rows:
        return {}
    batch = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        if all(isinstance(value, (bool, int, float, np.number, np.bool_)) for value in values):
            batch[name] = np.asarray(values)
            continue
        column = np.empty(len(values), dtype=object)
        column[:] = values
        batch[name] = column
    return batch
