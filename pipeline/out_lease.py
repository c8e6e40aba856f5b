"""A lease on OUT: at most one `hqsam refine` run writes a folder at a time, on local disks and on
object stores.

The lease is OUT/_hqsam_lease.json (Parquet readers skip names starting with `_`): the owner (host,
pid, start, a random token) and a heartbeat that the owner refreshes while it works. Another run
refuses while the lease is alive; a lease whose heartbeat is older than its timeout, or whose owner
process is gone from this host, is taken over with a warning. The lease is released at the end,
also when the run fails.

Creation is create-if-absent. Locally the complete lease is hard-linked into place, which fails when
the name exists (O_EXCL semantics, but the file is never seen half-written). An object store has no
atomic create with a plain PUT, so the lease is written, left to settle for SETTLE_S, and read back:
of runs that race, the last writer wins and every other one sees its token and refuses. The residual
race: a run that stalls for longer than SETTLE_S between finding no lease and writing its own can
overwrite the lease of a run that has already read its own back; both then run. Staleness compares
the owner's wall clock with the reader's, so hosts that share an OUT need clocks within the timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError

log = logging.getLogger(__name__)

LEASE_NAME = "_hqsam_lease.json"
STALE_AFTER_S = 300.0  # a lease without a heartbeat for this long belongs to a lost run
SETTLE_S = 1.0  # object stores: how long a written lease settles before it is read back
BEATS_PER_TIMEOUT = 4  # heartbeats per timeout: a few may fail before the lease goes stale


class OutputLeasedError(HqsamError):
    """Another run holds the lease on OUT."""


@dataclass
class Lease:
    """A lease this process holds on `out`."""

    out: str
    record: dict
    made_folder: bool = False  # locally: the lease made OUT, so an empty OUT goes with it
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def uri(self) -> str:
        return lease_uri(self.out)

    @property
    def token(self) -> str:
        return self.record["token"]


def lease_uri(out: str) -> str:
    return storage.join(out, LEASE_NAME)


@contextlib.contextmanager
def out_lease(
    out: str, *, stale_after_s: float = STALE_AFTER_S, settle_s: float = SETTLE_S
) -> Iterator[Lease]:
    """Hold the lease on `out` for the block, with a heartbeat; raise OutputLeasedError if another
    live run holds it. Released when the block ends, with or without an error."""
    lease = acquire(out, stale_after_s=stale_after_s, settle_s=settle_s)
    beat = threading.Thread(target=_heartbeat, args=(lease,), name="hqsam-lease-heartbeat", daemon=True)
    beat.start()
    try:
        yield lease
    finally:
        lease.stop.set()
        beat.join()
        try:
            release(lease)
        except Exception as error:  # never hide the run's own error; a stale lease expires anyway
            log.warning("could not release the lease on %s: %s", storage.redact(out), error)


def refuse_if_leased(out: str) -> None:
    """Raise OutputLeasedError when a live run holds `out` (a check that creates nothing)."""
    holder = read_lease(out)
    if holder is not None and not is_stale(holder):
        raise OutputLeasedError(_held_by(out, holder))


def acquire(out: str, *, stale_after_s: float = STALE_AFTER_S, settle_s: float = SETTLE_S) -> Lease:
    """Take the lease on `out`, taking over a stale one; OutputLeasedError when a live run holds it."""
    holder = read_lease(out)
    if holder is not None:
        if not is_stale(holder):
            raise OutputLeasedError(_held_by(out, holder))
        log.warning("taking over the lease on %s: %s", storage.redact(out), _stale_reason(holder))
    lease = Lease(out, _new_record(stale_after_s))
    fs, path = storage.url_to_fs(lease.uri)
    if storage.is_local(fs):
        lease.made_folder = not os.path.isdir(os.path.dirname(path))
        _create_local(path, lease.record, replacing=holder)
    else:
        storage.write_bytes(lease.uri, _encoded(lease.record))
        time.sleep(settle_s)
        winner = read_lease(out)
        if winner is None or winner.get("token") != lease.token:
            raise OutputLeasedError(_held_by(out, winner or {}))
    return lease


def release(lease: Lease) -> None:
    """Remove the lease if it is still ours, and OUT too when the lease made it and it stayed empty."""
    holder = read_lease(lease.out)
    if holder is not None and holder.get("token") == lease.token:
        storage.remove(lease.uri)
    elif holder is not None:
        log.warning("the lease on %s was taken over by %s", storage.redact(lease.out), _owner(holder))
    if lease.made_folder:
        with contextlib.suppress(OSError):  # not empty: the run wrote something
            os.rmdir(storage.url_to_fs(lease.out)[1])


def read_lease(out: str) -> dict | None:
    """The lease record in `out`, None without one; an unreadable lease reads as {} (stale)."""
    try:
        record = storage.read_json(lease_uri(out))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def is_stale(record: dict) -> bool:
    """A lease is stale when its heartbeat is older than its timeout, or its owner process is gone
    from this very host (a killed run can be resumed at once)."""
    return _stale_reason(record) is not None


def _stale_reason(record: dict) -> str | None:
    try:
        age = time.time() - float(record["heartbeat"])
        timeout = float(record["stale_after_s"])
    except (KeyError, TypeError, ValueError):
        return "it is unreadable"
    if age > timeout:
        return f"{_owner(record)} has not renewed it for {age:.0f} s (timeout {timeout:.0f} s)"
    if _on_this_host(record) and not _process_alive(int(record.get("pid", 0))):
        return f"{_owner(record)} is no longer running"
    return None


def _new_record(stale_after_s: float) -> dict:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
        "token": uuid.uuid4().hex,
        "heartbeat": now,
        "stale_after_s": stale_after_s,
    }


def _create_local(path: str, record: dict, *, replacing: dict | None) -> None:
    """Create the lease file only if absent: write a temp file whole, then hard-link it into place
    (where hard links are unsupported, create it with O_EXCL and write it)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    if replacing is not None and read_lease(folder) == replacing:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # the stale lease read above (another run may take it over as well)
    temp = f"{folder}/.{LEASE_NAME}.{record['token']}.tmp"
    try:
        with open(temp, "wb") as handle:
            handle.write(_encoded(record))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            raise
        except OSError:  # some network and FUSE filesystems have no hard links
            with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "wb") as handle:
                handle.write(_encoded(record))
    except FileExistsError:
        raise OutputLeasedError(_held_by(folder, read_lease(folder) or {})) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)


def _heartbeat(lease: Lease) -> None:
    interval = float(lease.record["stale_after_s"]) / BEATS_PER_TIMEOUT
    while not lease.stop.wait(interval):
        try:
            holder = read_lease(lease.out)
            if holder is None or holder.get("token") != lease.token:
                log.error("lost the lease on %s to %s", storage.redact(lease.out), _owner(holder or {}))
                return
            lease.record["heartbeat"] = time.time()
            storage.write_bytes(lease.uri, _encoded(lease.record))
        except Exception as error:  # a missed beat is not worth failing the run for; the next may pass
            log.warning("could not renew the lease on %s: %s", storage.redact(lease.out), error)


def _held_by(out: str, record: dict) -> str:
    age = time.time() - float(record.get("heartbeat", time.time()))
    return (
        f"another hqsam run ({_owner(record)}, started {record.get('started', '?')}, "
        f"last heartbeat {age:.0f} s ago) is writing {storage.redact(out)}; wait for it to end or "
        f"choose another --out (a lease not renewed for {float(record.get('stale_after_s', STALE_AFTER_S)):.0f} s "
        "is taken over)"
    )


def _owner(record: dict) -> str:
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')}"


def _on_this_host(record: dict) -> bool:
    return record.get("host") == socket.gethostname() and record.get("boot_id") == _boot_id()


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return None


def _encoded(record: dict) -> bytes:
    return json.dumps(record, indent=2).encode()
