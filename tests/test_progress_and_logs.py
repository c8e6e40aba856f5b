"""Progress and a quiet stderr (issue 13, points 2 and 3).

Unit tests of the reporter (pipeline/progress.py) run fast; the end-to-end tests run the installed
`hqsam refine` on examples/shapes with random weights, in a pseudo-terminal and with stderr to a pipe.
"""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hqsam.pipeline.progress import PLAIN_EVERY_S, ProgressReporter, format_duration

ROOT = Path(__file__).resolve().parents[1]
HQSAM = Path(sys.executable).parent / "hqsam"
SHAPES = ROOT / "examples" / "shapes" / "annotations.json"
SHAPES_ROWS = 12

# Lines Ray printed on a local refine before issue 13; none may reach a user by default.
RAY_NOISE = (
    "Token authentication is enabled",
    "RayDeprecationWarning",
    "ray_remote_args",
    "streaming_executor",
    "Execution plan",
    "core_worker.cc",
    "constructor arguments in the object store",
    "Progress bars disabled",
    "issue_detector",
    "in the appropriate function or method call",
)
PROGRESS_LINE = re.compile(r"^refine (\d+)/(\d+) rows \(\d+%\), [\d.]+ img/s, ETA [\d:?]+, \d+ failed$")
OUR_LINE = re.compile(r"^(hqsam: |error: |\d+ annotations have no output row$)")
# the input's reading bar, before the refine's (pipeline/task_source.py)
READING_LINE = re.compile(r"^reading (\d+)/(\d+) MiB \(\d+%\), [\d.]+ MiB/s, ETA [\d:?]+$")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def reporter(
    total: int | None, *, interactive: bool, **kwargs
) -> tuple[ProgressReporter, io.StringIO, FakeClock]:
    stream, clock = io.StringIO(), FakeClock()
    progress = ProgressReporter(
        "refine", total, stream=stream, interactive=interactive, clock=clock, **kwargs
    )
    return progress, stream, clock


# ---------------------------------------------------------------- the reporter (fast)


def test_rate_and_eta_follow_the_work_done_so_far() -> None:
    progress, _, clock = reporter(100, interactive=False, rate_unit="img/s", counters=("failed",))
    assert progress.rate() == 0 and progress.eta_s() is None
    clock.now += 10
    progress.advance(25, work=5, failed=2)
    assert progress.rate() == pytest.approx(0.5)  # 5 images in 10 s
    assert progress.eta_s() == pytest.approx(30.0)  # 75 rows left at 2.5 rows/s
    clock.now += 10
    progress.advance(25, work=5, failed=1)
    assert progress.eta_s() == pytest.approx(20.0)
    assert progress.line() == "refine 50/100 rows (50%), 0.50 img/s, ETA 0:00:20, 3 failed"


def test_values_are_shown_as_given_and_counters_add_up() -> None:
    progress, _, clock = reporter(10, interactive=False, unit="steps", rate_unit="samples/s")
    clock.now += 4
    progress.advance(2, work=8, loss="0.5000")
    progress.advance(0, loss="0.2500")
    assert progress.line() == "refine 2/10 steps (20%), 2.00 samples/s, ETA 0:00:16, loss 0.2500"


def test_plain_lines_come_every_tenth_and_every_ten_seconds_without_control_characters() -> None:
    progress, stream, clock = reporter(100, interactive=False, counters=("failed",))
    progress.advance(0)  # the first line at once
    for _ in range(9):  # 1% a second: the 10% mark comes at 10 s as the 10 s mark does
        clock.now += 1
        progress.advance(1)
    assert len(stream.getvalue().splitlines()) == 1
    clock.now += 1
    progress.advance(1)  # 10%
    assert len(stream.getvalue().splitlines()) == 2
    progress.advance(5)  # 15%: no new tenth, no 10 s
    assert len(stream.getvalue().splitlines()) == 2
    clock.now += PLAIN_EVERY_S
    progress.advance(0)  # nothing done, but 10 s since the last line
    assert len(stream.getvalue().splitlines()) == 3
    progress.advance(60)  # 75%: a tenth passed
    progress.close()  # the last line already says 75/100: not written twice
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("refine 75/100 rows (75%)")
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert stream.getvalue().endswith("\n")


def test_the_last_plain_line_comes_once_and_after_any_change() -> None:
    progress, stream, clock = reporter(10, interactive=False, counters=("failed",))
    progress.advance(10)  # 100%: a tenth passed, printed at once
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refine 10/10 rows (100%)")
    progress, stream, clock = reporter(10, interactive=False, counters=("failed",))
    progress.advance(5)
    progress.advance(0, failed=1)  # a change between tenths: the closing line shows it
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].endswith("1 failed")


def test_in_place_line_is_redrawn_with_carriage_returns_and_ends_with_a_newline() -> None:
    progress, stream, clock = reporter(4, interactive=True, unit="rows", rate_unit="img/s")
    with progress:
        clock.now += 1
        progress.advance(2, work=1)
        clock.now += 1
        progress.advance(2, work=1)
    text = stream.getvalue()
    assert text.count("\r") >= 3 and text.endswith("\n") and "\x1b" not in text
    assert text.rstrip("\n").split("\r")[-1].rstrip() == "refine 4/4 rows (100%), 1.00 img/s, ETA 0:00:00"
    # a shorter line overwrites a longer one completely (padding, no ANSI erase)
    assert all(
        len(part) >= len(prev.rstrip()) for prev, part in zip(text.split("\r")[1:], text.split("\r")[2:])
    )


def test_disabled_reporter_prints_nothing() -> None:
    progress, stream, _ = reporter(4, interactive=False, enabled=False)
    with progress:
        progress.advance(4)
    assert stream.getvalue() == ""


def test_no_total_and_durations() -> None:
    progress, _, clock = reporter(None, interactive=False)
    clock.now += 2
    progress.advance(4)
    assert progress.line() == "refine 4 rows, 2.00 rows/s, ETA ?"
    assert format_duration(3725.4) == "1:02:05" and format_duration(None) == "?"


def test_ray_advice_is_dropped_and_colours_stripped_off_a_terminal(monkeypatch) -> None:
    from hqsam.pipeline.console import _NoAdvice, _PlainText

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("ray.data", logging.WARNING, __file__, 1, message, None, None)

    advice = record(
        "To avoid out-of-\nmemory errors, set `memory=1` in the appropriate\nfunction or method call."
    )
    assert not _NoAdvice().filter(advice)
    assert _NoAdvice().filter(record("Operator 'X' failed: disk full"))
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert _PlainText(logging.Formatter("%(message)s")).format(record("\x1b[36mray::X()\x1b[39m failed")) == (
        "ray::X() failed"
    )


def test_the_native_log_filter_leaves_a_captured_stderr_open_and_writing() -> None:
    """CI: a CLI test's first Ray start replaced the test runner's stderr, which closed it under
    the runner ("I/O operation on closed file")."""
    from click.testing import CliRunner

    from hqsam.pipeline.console import _filter_native_stderr

    with CliRunner().isolation() as streams:
        restore = _filter_native_stderr("nothing matches this")
        try:
            print("still captured", file=sys.stderr)
            sys.stderr.flush()
        finally:
            restore()
    assert "still captured" in streams[1].getvalue().decode()


# ---------------------------------------------------------------- a local `hqsam refine` (slow)


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> Path:
    from hqsam.hqsam_core import build_hqsam, save_model
    from hqsam.hqsam_core.testing.random_weights import randomize_

    path = tmp_path_factory.mktemp("weights") / "random_vit_tiny.pth"
    save_model(randomize_(build_hqsam("vit_tiny"), seed=1), str(path))
    return path


def refine_argv(out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [str(HQSAM), "refine", str(SHAPES), "--out", str(out), "--checkpoint", str(checkpoint), *extra]


def child_env(**changes: str | None) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "COLUMNS": "120"}
    for name, value in changes.items():
        env.pop(name, None) if value is None else env.__setitem__(name, value)
    return env


def run_piped(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_refine_in_a_terminal_redraws_its_progress_line(tmp_path, random_checkpoint) -> None:
    output = run_in_a_terminal(refine_argv(tmp_path / "out", random_checkpoint))
    summary = output.index("annotations ")
    shown = output[:summary]
    draws = [part.strip() for part in shown.split("\r")[1:]]
    progress = [PROGRESS_LINE.match(draw.splitlines()[0]) for draw in draws if draw]
    assert len([m for m in progress if m]) >= 2, shown  # drawn, then redrawn in place
    last = [m for m in progress if m][-1]
    assert last.group(1) == last.group(2) == str(SHAPES_ROWS)


def run_in_a_terminal(argv: list[str]) -> str:
    """What a command prints in a pseudo-terminal (stdin, stdout and stderr); it must exit 0."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        argv, stdin=terminal, stdout=terminal, stderr=terminal, env=child_env(), start_new_session=True
    )
    os.close(terminal)
    output = read_until_exit(controller, process)
    assert process.returncode == 0, output[-3000:]
    return output


def read_until_exit(controller: int, process: subprocess.Popen, timeout_s: float = 600) -> str:
    chunks, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 1.0)
        if ready:
            try:
                data = os.read(controller, 65536)
            except OSError:  # the terminal's last writer closed it
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    process.wait(timeout=60)
    os.close(controller)
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_refine_is_quiet_by_default_with_plain_progress_lines_in_a_pipe(tmp_path, random_checkpoint) -> None:
    result = run_piped(refine_argv(tmp_path / "out", random_checkpoint), child_env(RAY_AUTH_MODE=None))
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines, "nothing printed"
    ours = (OUR_LINE, PROGRESS_LINE, READING_LINE)
    strangers = [line for line in lines if not any(pattern.match(line) for pattern in ours)]
    assert not strangers, "\n".join(strangers)
    for noise in RAY_NOISE:
        assert noise not in result.stderr
    progress = [PROGRESS_LINE.match(line) for line in lines if PROGRESS_LINE.match(line)]
    assert len(progress) >= 2  # the first line and the last at least
    assert progress[-1].group(1) == progress[-1].group(2) == str(SHAPES_ROWS)
    assert any(line.startswith("hqsam: 4 images to refine") for line in lines)
    assert result.stdout.startswith("annotations")


@pytest.mark.slow
def test_verbose_refine_shows_rays_logs(tmp_path, random_checkpoint) -> None:
    result = run_piped(refine_argv(tmp_path / "out", random_checkpoint, "-v"), child_env())
    assert "streaming_executor" in result.stderr or "Execution plan" in result.stderr, result.stderr[-3000:]
    assert "\x1b" not in result.stderr
