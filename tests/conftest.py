"""Shared fixtures: paths to the shared real fixtures, random-weight models."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hqsam.hqsam_core.allocator import retain_freed_memory
from hqsam.hqsam_core.testing.random_weights import randomize_

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
retain_freed_memory()  # as our CPU workers do: CPU forward passes without page-fault storms

ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` (what truly needs a CUDA GPU; `pytest -m cuda` selects them all) skip
    where there is none."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if not torch.cuda.is_available():
        for item in marked:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def unwritten_tasks(tasks, out: Path):
    """The task rows of the Arrow table `tasks` without rows in OUT yet, found as a run finds them:
    counted against OUT (pipeline/out_tally.py), then dropped by the source's filter."""
    import tempfile

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from hqsam.pipeline.out_tally import count_out
    from hqsam.pipeline.task_source import drop_written

    with tempfile.TemporaryDirectory() as folder:
        part = str(Path(folder) / "part-00000.parquet")
        pq.write_table(tasks, part)
        positions = (pc.max(pc.list_flatten(tasks["ann_indices"])).as_py() or 0) + 1
        _, written = count_out([part], str(out), positions)
    return drop_written(tasks, written)


def shared_fixture(name: str) -> Path:
    """Path of a fixture in ../shared/fixtures, skipping the test cleanly when absent."""
    path = SHARED_FIXTURES / name
    if not path.exists():
        pytest.skip(f"shared fixture {path} is absent")
    return path


def session_members(session: int) -> list[int]:
    """Pids of the live processes in a session (Ray's processes stay in the session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the command and every process of its session (driver, Ray, workers): a lost machine.

    Ray's workers leave the process group but stay in the session, so the session is what is killed."""
    for pid in [process.pid, *session_members(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while session_members(process.pid) and time.monotonic() < deadline:
        for pid in session_members(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    assert not session_members(process.pid)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            "local",  # never a stale or foreign Ray on this machine
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=512 * 2**20,
            log_to_driver=False,
            configure_logging=False,
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1 with test credentials in the environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture()
def s3_bucket(s3_endpoint):
    """A fresh bucket; yields its name."""
    import uuid

    import s3fs

    name = f"hqsam-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield name


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weights vit_tiny checkpoint in the official format, written by the test session."""
    from hqsam.hqsam_core import build_hqsam, save_model

    path = tmp_path_factory.mktemp("weights") / "hqsam_vit_tiny_random.pth"
    save_model(randomize_(build_hqsam("vit_tiny"), seed=1234), str(path))
    return path
