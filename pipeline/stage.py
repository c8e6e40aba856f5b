"""The one protocol of the pipeline's units (readers' stages, stages and writers), and its two runners.

A `Stage` turns a list of rows (dicts) into a list of rows, and declares which fields it reads, adds
and drops (the rows themselves are declared in `schemas/`). The same chain of stages runs

- under Ray Data (`apply_ray`): row stages as tasks, batch stages as `map_batches`, stages that hold a
  model on an actor pool, each with the Ray options it asks for;
- as a plain local loop (`run_local`): one process, no Ray, for unit tests, benchmarks and debugging.

Heavy state (a model) is built in `setup()`, which runs once where the stage runs (on the actor under
Ray), so a stage object itself stays small enough to pickle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import numpy as np

Row = dict[str, Any]


class Stage:
    """One step of a chain: `process(rows) -> rows`.

    - `reads` / `adds` / `drops`: the fields it needs, the fields it adds and the fields it removes;
    - `batch_size`: None processes row by row; an int gives the stage lists of up to that many rows;
    - `on_actor`: the stage holds state worth keeping between calls (a model): an actor pool under Ray.
    """

    reads: ClassVar[tuple[str, ...]] = ()
    adds: ClassVar[tuple[str, ...]] = ()
    drops: ClassVar[tuple[str, ...]] = ()
    batch_size: int | None = None
    on_actor: bool = False

    def setup(self) -> None:
        """Build heavy state; called once before the first `process`, where the stage runs."""

    def process(self, rows: list[Row]) -> list[Row]:
        raise NotImplementedError

    def ray_options(self) -> dict[str, Any]:
        """Extra keyword arguments for Ray Data's map/map_batches (resources, compute strategy)."""
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


def apply_ray(dataset, stages: list[Stage]):
    """`dataset` with the chain appended as Ray Data operators (lazy)."""
    for stage in stages:
        options = stage.ray_options()
        if stage.on_actor:
            dataset = dataset.map_batches(
                _BatchOnActor,
                fn_constructor_args=(stage,),
                batch_size=stage.batch_size or 1,
                batch_format="numpy",
                **options,
            )
        elif stage.batch_size:
            dataset = dataset.map_batches(
                _batch_task(stage), batch_size=stage.batch_size, batch_format="numpy", **options
            )
        else:
            dataset = dataset.flat_map(_row_task(stage), **options)
    return dataset


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
