"""One progress reporter for every long-running command (refine, train, evaluate).

In a terminal it keeps one line refreshed in place (a carriage return, the line padded with spaces:
no ANSI codes); when stderr is not a terminal, or inside a Ray job (whose logs are files), it prints
plain lines instead: the first, one every `PLAIN_EVERY_S` seconds or `PLAIN_EVERY_SHARE` of the
total, whichever comes first, and the last.

    with ProgressReporter("refine", total=12, unit="rows", rate_unit="img/s") as progress:
        progress.advance(3, work=1, failed=0)
    # refine 3/12 rows (25%), 0.50 img/s, ETA 0:00:18, 0 failed
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

PLAIN_EVERY_S = 10.0  # a plain line at least this often...
PLAIN_EVERY_SHARE = 0.1  # ...and at every tenth of the total
REFRESH_EVERY_S = 0.2  # the in-place line is redrawn at most this often
TICK_S = 1.0  # between updates the line is redrawn (rate, ETA) this often


class ProgressReporter:
    """Counts `done` of `total` units and the `work` behind them (the rate), plus named counters.

    - `unit`: what done/total count ("rows", "steps", "samples");
    - `rate_unit`: the rate's unit; the rate is the work done per second since the start (work
      defaults to the units done, e.g. refine counts rows but reports images per second);
    - `counters`: totals shown after the ETA, e.g. {"failed": 0}, updated by `advance(**counts)`;
    - `values`: last values shown as they are, e.g. `advance(1, loss="0.4312")`;
    - `resume_at(done)`: the work starts (again) here, `done` units already done (a resumed run);
    - `interrupted()`: lets other lines (log records) be written above the in-place line.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        unit: str = "rows",
        rate_unit: str | None = None,
        counters: tuple[str, ...] = (),
        enabled: bool = True,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.rate_unit = rate_unit or f"{unit}/s"
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = in_place(self.stream) if interactive is None else interactive
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.work = 0.0
        self._skipped = 0  # units done before the work started (resume_at): not in the ETA
        self.counts = dict.fromkeys(counters, 0)
        self.values: dict[str, str] = {}
        self._last_draw = -math.inf
        self._last_plain = -math.inf
        self._last_plain_text = ""
        self._next_share = 0.0
        self._width = 0
        self._closed = False
        self._lock = threading.RLock()  # re-entered from within interrupted()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> ProgressReporter:
        """Show the first line, and keep it current between updates (a waiting run still shows)."""
        self._show(final=False)
        if self.enabled:
            self._ticker = threading.Thread(target=self._tick, name="hqsam-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advance(self, done: int = 0, *, work: float | None = None, **updates: int | str) -> None:
        """`done` more units (and `work` behind them); counters add, values replace."""
        with self._lock:
            self.done += done
            self.work += done if work is None else work
            for name, value in updates.items():
                if name in self.counts:
                    self.counts[name] += int(value)
                else:
                    self.values[name] = str(value)
        self._show(final=False)

    def resume_at(self, done: int) -> None:
        """The work starts now, `done` units already done: rate and ETA count from here on (a run
        that waited for its workers, resumed from a checkpoint, or restarted after a failure)."""
        with self._lock:
            self.done = self._skipped = done
            self.work = 0.0
            self.started = self.clock()
        self._show(final=False)

    @contextlib.contextmanager
    def interrupted(self) -> Iterator[None]:
        """Within it other output may be written on the stream: the in-place line is cleared
        first and redrawn after; plain lines need neither."""
        with self._lock:
            if self.enabled and self.interactive and self._width:
                self._write("\r" + " " * self._width + "\r")
                self._width = 0
            yield
            if self.enabled and self.interactive and not self._closed:
                self._last_draw = -math.inf
                self._draw(final=False)

    def rate(self) -> float:
        """Work per second since the start (0 before any)."""
        elapsed = self.clock() - self.started
        return self.work / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; None without a total or a rate yet."""
        counted = self.done - self._skipped
        if self.total is None or counted <= 0:
            return None
        elapsed = self.clock() - self.started
        if elapsed <= 0:
            return None
        return max(self.total - self.done, 0) * elapsed / counted

    def line(self) -> str:
        """The progress as one line of text."""
        if self.total:
            share = f" ({100 * self.done / self.total:.0f}%)"
            head = f"{self.label} {self.done}/{self.total} {self.unit}{share}"
        else:
            head = f"{self.label} {self.done} {self.unit}"
        parts = [head, f"{self.rate():.2f} {self.rate_unit}", f"ETA {format_duration(self.eta_s())}"]
        parts += [f"{name} {value}" for name, value in self.values.items()]
        parts += [f"{count} {name}" for name, count in self.counts.items()]
        return ", ".join(parts)

    def close(self) -> None:
        """The last line (and the end of the in-place one)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self._show(final=True)
        if self.enabled and self.interactive:
            self._write("\n")

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            self._show(final=False)

    def _show(self, *, final: bool) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._draw(final)

    def _draw(self, final: bool) -> None:
        now = self.clock()
        if self.interactive:
            if final or now - self._last_draw >= REFRESH_EVERY_S:
                self._last_draw = now
                text = self.line()
                self._write("\r" + text.ljust(self._width))
                self._width = len(text)
            return
        share = self.done / self.total if self.total else 0.0
        if final or now - self._last_plain >= PLAIN_EVERY_S or share >= self._next_share:
            self._last_plain = now
            self._next_share = (math.floor(share / PLAIN_EVERY_SHARE) + 1) * PLAIN_EVERY_SHARE
            text = self.line()
            if not (final and text == self._last_plain_text):  # the last line was already this one
                self._write(text + "\n")
                self._last_plain_text = text

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def in_place(stream: TextIO) -> bool:
    """Whether a line can be redrawn in place on `stream`: a terminal, and not a Ray job's log."""
    from hqsam.pipeline.cluster import in_ray_job

    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not in_ray_job()


def format_duration(seconds: float | None) -> str:
    """H:MM:SS, or "?" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
