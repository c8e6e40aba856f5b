"""`hqsam train`'s progress and quiet stderr (issue 13, points 2 and 3).

The reporter's resume and interruption, and the worker-to-driver messages over a real Ray queue, run
fast; the end-to-end tests run the installed `hqsam train` (1 CPU worker, 2 and then 3 steps of
a generated folder pair): with stderr to a pipe (plain lines), then resumed in a pseudo-terminal.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hqsam.hqsam_core.testing.thin_structures import generate_thin_structures
from hqsam.pipeline.progress import ProgressReporter
from hqsam.pipeline.train_progress import StepTeller, TrainingProgress
from tests.test_progress_and_logs import HQSAM, RAY_NOISE, FakeClock, child_env, run_in_a_terminal

TRAIN_LINE = re.compile(
    r"^train (\d+)/(\d+) steps \(\d+%\), [\d.]+ samples/s, ETA [\d:?]+"
    r"(?:, epoch \d+/\d+, loss (\d+\.\d{4}))?$"
)
OUR_LINE = re.compile(r"^hqsam: ")
# What `hqsam train` printed before: its workers' lines and Ray Train's, forwarded by Ray.
TRAIN_NOISE = (*RAY_NOISE, "[hqsam train]", "RayTrainWorker", "TrainController", "RunConfig(name)", "pid=")


# ---------------------------------------------------------------- the reporter and the queue (fast)


def test_resume_at_counts_the_rate_and_eta_from_there() -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = ProgressReporter(
        "train", 100, unit="steps", rate_unit="samples/s", stream=stream, interactive=False, clock=clock
    )
    clock.now += 30  # Ray Train starting its workers: not training time
    progress.resume_at(40)  # a run resumed at step 40
    assert progress.eta_s() is None and progress.rate() == 0
    clock.now += 10
    progress.advance(10, work=40, loss="0.5000")
    assert progress.rate() == pytest.approx(4.0)  # 40 samples in the 10 s since the start
    assert progress.eta_s() == pytest.approx(50.0)  # 50 steps left at 1 step/s
    assert progress.line() == "train 50/100 steps (50%), 4.00 samples/s, ETA 0:00:50, loss 0.5000"


def test_interrupted_clears_the_in_place_line_and_redraws_it() -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = ProgressReporter("train", 10, unit="steps", stream=stream, interactive=True, clock=clock)
    with progress:
        clock.now += 1
        progress.advance(5)
        with progress.interrupted():
            stream.write("hqsam: epoch 1 done\n")
            progress.advance(1)  # re-entrant: the lock is the caller's
        before, after = stream.getvalue().split("hqsam: epoch 1 done\n")
    drawn = before.split("\r")
    assert drawn[-1] == "" and drawn[-2].strip() == ""  # the last line blanked, the cursor at its start
    assert after.startswith("\rtrain 6/10 steps")  # redrawn at once below the log line
    assert "\x1b" not in stream.getvalue()


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_worker_messages_reach_the_driver_over_a_ray_queue(ray_session) -> None:
    stream, logged = io.StringIO(), Collect()
    logger = logging.getLogger("hqsam.pipeline.train_progress")  # whatever configured "hqsam" before
    logger.addHandler(logged)
    logger.setLevel(logging.INFO)
    try:
        with TrainingProgress(total=6, samples_per_step=4, epochs=3, stream=stream) as shown:
            teller = StepTeller(shown.queue, window=2)
            teller.started(2, epoch=1)  # resumed at step 2, in the second epoch
            for step, loss in [(3, 1.0), (4, 0.5), (5, 0.25)]:
                teller.step(step, epoch=1, loss=loss)
            teller.note("epoch 2 done: loss 0.5833")
            teller.step(6, epoch=2, loss=0.125)
    finally:
        logger.removeHandler(logged)
        logger.setLevel(logging.NOTSET)
    lines = stream.getvalue().splitlines()
    assert all(TRAIN_LINE.match(line) for line in lines), lines
    assert lines[-1].startswith("train 6/6 steps (100%)") and lines[-1].endswith("epoch 3/3, loss 0.1875")
    assert shown.reporter.work == 4 * 4  # four steps of this run, four samples each
    assert logged.messages == ["resuming at step 2 (epoch 2)", "epoch 2 done: loss 0.5833"]
    silent = StepTeller(None, window=3)  # ranks other than 0, and --no-progress
    silent.step(1, epoch=0, loss=1.0)
    assert list(silent.losses) == [1.0]


# ---------------------------------------------------------------- a local `hqsam train` (slow)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pair")
    (root / "im").mkdir()
    (root / "gt").mkdir()
    for i, (image, mask) in enumerate(generate_thin_structures(4, 3, size=64)):
        Image.fromarray(image).save(root / "im" / f"s{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "gt" / f"s{i}.png")
    return root


def train_argv(out: Path, data: Path, checkpoint: Path, max_steps: int) -> list[str]:
    return [
        *(str(HQSAM), "train", "--data", str(data), "--out", str(out), "--checkpoint", str(checkpoint)),
        *("--device", "cpu", "--workers", "1", "--batch-size", "1", "--cpus-per-worker", "0.5"),
        *("--max-steps", str(max_steps), "--log-every", "1"),
    ]


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory, pair: Path, tiny_checkpoint: Path):
    """Two steps with stderr to a pipe and Ray's default authentication (RAY_AUTH_MODE unset)."""
    out = tmp_path_factory.mktemp("train") / "run"
    argv = train_argv(out, pair, tiny_checkpoint, max_steps=2)
    result = subprocess.run(
        argv, env=child_env(RAY_AUTH_MODE=None), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_train_is_quiet_by_default_with_plain_progress_lines_in_a_pipe(piped_run) -> None:
    _, result = piped_run
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    lines = result.stderr.splitlines()
    strangers = [line for line in lines if not (OUR_LINE.match(line) or TRAIN_LINE.match(line))]
    assert not strangers, "\n".join(strangers)
    for noise in TRAIN_NOISE:
        assert noise not in result.stderr, noise
    progress = [TRAIN_LINE.match(line) for line in lines if TRAIN_LINE.match(line)]
    assert len(progress) >= 3  # the first line, at least one step's, the last
    assert [m.group(1) for m in progress][-1] == progress[-1].group(2) == "2"
    losses = [float(m.group(3)) for m in progress if m.group(3)]
    assert losses and all(np.isfinite(loss) and loss > 0 for loss in losses)
    assert any(line.startswith("hqsam: training on 4 samples") for line in lines)
    assert any(line.startswith("hqsam: epoch 1 stopped at --max-steps: loss ") for line in lines)
    assert result.stdout.startswith("trained 2 steps")


@pytest.mark.slow
def test_resumed_train_in_a_terminal_redraws_its_progress_line(
    piped_run, pair: Path, tiny_checkpoint: Path, tmp_path
) -> None:
    first, _ = piped_run
    out = tmp_path / "run"
    shutil.copytree(first, out)
    output = run_in_a_terminal(train_argv(out, pair, tiny_checkpoint, max_steps=3))
    shown = output[: output.index("trained 3 steps")]
    assert "\x1b" not in shown
    for noise in TRAIN_NOISE:
        assert noise not in shown, noise
    assert "hqsam: resuming at step 2 (epoch 1)" in shown
    draws = [part.strip() for part in shown.split("\r")[1:] if part.strip()]
    progress = [TRAIN_LINE.match(draw.splitlines()[0]) for draw in draws]
    progress = [m for m in progress if m]
    assert len(progress) >= 2, shown  # drawn, then redrawn in place
    steps = [int(m.group(1)) for m in progress]  # 0 while the workers start, then 2 (resumed), 3
    assert 2 in steps and steps == sorted(steps) and steps[-1] == int(progress[-1].group(2)) == 3
