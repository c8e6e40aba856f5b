"""`hqsam train`'s progress: the rank-0 worker tells, the driver shows (pipeline/progress.py).

Ray Train runs the workers in actors whose output stays in Ray's logs (shown with -v only), and the
driver blocks in `trainer.fit()`; so rank 0 puts small messages in a `ray.util.queue.Queue` and a
thread of the driver turns them into the progress line:

    train 120/3000 steps (4%), 3.10 samples/s, ETA 0:46:27, epoch 1/12, loss 0.4312

and into our own log lines between it (a resumed run's start, each epoch's end with its scores).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, TextIO

from hqsam.pipeline.progress import ProgressReporter

log = logging.getLogger(__name__)

POLL_S = 0.5  # the driver's thread waits this long for a message before it checks for the end


class StepTeller:
    """The rank-0 worker's side: one message per step (the loss averaged over the last `window`
    steps), one when the worker group starts, free-text notes. A lost queue never stops training."""

    def __init__(self, queue: Any | None, window: int) -> None:
        self.queue = queue
        self.losses: deque[float] = deque(maxlen=max(1, window))

    def started(self, global_step: int, epoch: int) -> None:
        self._tell({"start": global_step, "epoch": epoch})

    def step(self, global_step: int, epoch: int, loss: float) -> None:
        self.losses.append(loss)
        self._tell({"step": global_step, "epoch": epoch, "loss": sum(self.losses) / len(self.losses)})

    def note(self, text: str) -> None:
        self._tell({"note": text})

    def _tell(self, message: dict) -> None:
        if self.queue is None:
            return
        try:
            self.queue.put_nowait(message)
        except Exception as error:  # the driver is gone or its queue failed: train on regardless
            print(f"hqsam: progress queue lost ({error}); training goes on", flush=True)
            self.queue = None


class TrainingProgress:
    """The driver's side: a queue for the workers (None when disabled) and a thread that shows what
    arrives in a ProgressReporter of `total` steps, `samples_per_step` samples each."""

    def __init__(
        self,
        total: int,
        samples_per_step: int,
        epochs: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.samples_per_step, self.epochs = samples_per_step, epochs
        self.reporter = ProgressReporter(
            "train", total, unit="steps", rate_unit="samples/s", enabled=enabled, stream=stream
        )
        self.queue = None
        if enabled:
            from ray.util.queue import Queue

            self.queue = Queue(actor_options={"num_cpus": 0})  # must not take a worker's CPU
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="hqsam-train-progress", daemon=True)

    def __enter__(self) -> TrainingProgress:
        self.reporter.__enter__()
        if self.queue is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.queue is not None:
            self._thread.join()
            self._drain()
            self.queue.shutdown()
        self.reporter.close()

    def _poll(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self.show(self.queue.get(timeout=POLL_S))
            except Empty:
                continue
            except Exception as error:  # the queue's actor died: the run's own errors are fit()'s
                log.debug("training progress stopped: %s", error)
                return

    def _drain(self) -> None:
        from ray.util.queue import Empty

        try:
            while True:
                self.show(self.queue.get_nowait())
        except Empty:
            pass
        except Exception as error:
            log.debug("training progress not drained: %s", error)

    def show(self, message: dict) -> None:
        """One worker message on the progress line (or as a log line above it)."""
        reporter = self.reporter
        if "start" in message:
            reporter.resume_at(message["start"])  # the rate from the workers' start on
            if message["start"]:
                with reporter.interrupted():
                    log.info("resuming at step %d (epoch %d)", message["start"], message["epoch"] + 1)
        elif "step" in message:
            steps = max(message["step"] - reporter.done, 0)
            epoch = f"{message['epoch'] + 1}/{self.epochs}"
            reporter.advance(
                steps, work=steps * self.samples_per_step, epoch=epoch, loss=f"{message['loss']:.4f}"
            )
        elif "note" in message:
            with reporter.interrupted():
                log.info("%s", message["note"])
