"""The lease on OUT (pipeline/out_lease.py) on a local disk and on S3 (moto's server): one holder at
a time, also when runs race; stale and orphaned leases taken over; a heartbeat; released on failure."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import threading
import time

import pytest

from hqsam.hqsam_core import storage
from hqsam.pipeline.out_lease import (
    LEASE_NAME,
    OutputLeasedError,
    acquire,
    is_stale,
    out_lease,
    read_lease,
    refuse_if_leased,
    release,
)


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path) -> str:
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/runs/out"
    return str(tmp_path / "out")


def names(out: str) -> list[str]:
    return [uri.rsplit("/", 1)[-1] for uri in storage.list_folder(out)]


def foreign_lease(out: str, **changes) -> dict:
    """The lease record of a run on another machine, written into `out`."""
    record = {
        "host": "another-machine",
        "boot_id": "another-boot",
        "pid": 4242,
        "started": "2024-01-01T00:00:00+0000",
        "token": "theirs",
        "heartbeat": time.time(),
        "stale_after_s": 300.0,
    } | changes
    storage.write_bytes(storage.join(out, LEASE_NAME), json.dumps(record).encode())
    return record


def test_one_holder_at_a_time_and_released_at_the_end(out) -> None:
    with out_lease(out, settle_s=0.2) as lease:
        held = read_lease(out)
        assert held["token"] == lease.token and held["pid"] > 0 and held["host"]
        with pytest.raises(OutputLeasedError) as refused:
            acquire(out, settle_s=0.2)
        message = str(refused.value)
        assert refused.value.exit_code == 2 and "\n" not in message
        assert message.startswith("another hqsam run") and f"pid {held['pid']}" in message
        with pytest.raises(OutputLeasedError):
            refuse_if_leased(out)
        assert names(out) == [LEASE_NAME]
    assert read_lease(out) is None
    refuse_if_leased(out)


def test_racing_runs_get_exactly_one_lease(out) -> None:
    winners, losers = [], []
    start = threading.Barrier(4)

    def contend() -> None:
        start.wait()
        try:
            winners.append(acquire(out, settle_s=1.0))
        except OutputLeasedError as error:
            losers.append(error)

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1 and len(losers) == 3, (winners, losers)
    assert read_lease(out)["token"] == winners[0].token
    release(winners[0])
    assert read_lease(out) is None


def test_a_live_lease_of_another_machine_is_respected(out) -> None:
    foreign_lease(out, heartbeat=time.time() - 100)
    with pytest.raises(OutputLeasedError, match="pid 4242 on another-machine"):
        acquire(out, settle_s=0.2)
    assert read_lease(out)["token"] == "theirs"


def test_a_stale_lease_is_taken_over_with_a_warning(out, caplog) -> None:
    foreign_lease(out, heartbeat=time.time() - 301)
    assert is_stale(read_lease(out))
    with caplog.at_level(logging.WARNING), out_lease(out, settle_s=0.2) as lease:
        assert read_lease(out)["token"] == lease.token
    assert "taking over the lease" in caplog.text
    assert re.search(r"pid 4242 on another-machine has not renewed it for 3\d\d s", caplog.text)
    assert read_lease(out) is None


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(out, caplog) -> None:
    with out_lease(out, settle_s=0.2) as mine:
        record = dict(mine.record)
    dead = subprocess.Popen(["true"])  # a pid that no longer runs
    dead.wait()
    storage.write_bytes(storage.join(out, LEASE_NAME), json.dumps(record | {"pid": dead.pid}).encode())
    with caplog.at_level(logging.WARNING), out_lease(out, settle_s=0.2):
        pass
    assert f"pid {dead.pid} on {record['host']} is no longer running" in caplog.text


def test_an_unreadable_lease_counts_as_stale(out) -> None:
    storage.write_bytes(storage.join(out, LEASE_NAME), b'{"host": "half a lea')
    refuse_if_leased(out)
    with out_lease(out, settle_s=0.2) as lease:
        assert read_lease(out)["token"] == lease.token


def test_the_heartbeat_keeps_the_lease_fresh(out) -> None:
    with out_lease(out, stale_after_s=0.8, settle_s=0.2) as lease:
        first = read_lease(out)["heartbeat"]
        time.sleep(1.6)
        held = read_lease(out)
        assert held["token"] == lease.token and held["heartbeat"] > first
        assert time.time() - held["heartbeat"] < 0.8 and not is_stale(held)


def test_released_on_failure_and_an_out_it_made_goes_with_it(tmp_path) -> None:
    out = tmp_path / "made"
    with pytest.raises(RuntimeError), out_lease(str(out)):
        assert (out / LEASE_NAME).exists()
        raise RuntimeError("the run failed")
    assert not out.exists()

    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(RuntimeError), out_lease(str(kept)):
        raise RuntimeError("the run failed")
    assert kept.is_dir() and not list(kept.iterdir())

    with out_lease(str(out)):
        (out / "part-0.parquet").write_bytes(b"rows")
    assert sorted(p.name for p in out.iterdir()) == ["part-0.parquet"]


def test_a_lease_taken_over_is_not_released_by_its_former_holder(out, caplog) -> None:
    lease = acquire(out, settle_s=0.2)
    theirs = foreign_lease(out)
    with caplog.at_level(logging.WARNING):
        release(lease)
    assert read_lease(out) == theirs
    assert "taken over by pid 4242 on another-machine" in caplog.text


def test_without_hard_links_the_lease_is_created_exclusively(tmp_path, monkeypatch) -> None:
    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")  # as on some network and FUSE mounts

    monkeypatch.setattr("hqsam.pipeline.out_lease.os.link", no_links)
    out = str(tmp_path / "out")
    lease = acquire(out)
    assert read_lease(out) == lease.record and names(out) == [LEASE_NAME]
    with pytest.raises(OutputLeasedError):
        acquire(out)
    release(lease)
    assert read_lease(out) is None
