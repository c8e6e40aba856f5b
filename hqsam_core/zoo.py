"""Turn any checkpoint source (zoo name, URL, fsspec URI or local path) into a verified local file.

Pinning: a source may end in `#sha256=HEX` (64 hex digits; `--checkpoint-sha256` adds it), and
HQSAM_ZOO_SHA256 pins zoo files by name (`sam_hq_vit_l=HEX,sam_vit_h=HEX`), e.g. for a mirror set
with HQSAM_ZOO_URL. A pinned file whose sha256 differs is refused: downloads are discarded before
they enter the cache. Every download prints its sha256 (so that it can be pinned) and records it
beside the cached file (`<file>.sha256`), so that checking a pin later costs no hashing.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from hqsam.hqsam_core import storage
from hqsam.hqsam_core.errors import HqsamError
from hqsam.hqsam_core.random_weights import is_random_weights
from hqsam.hqsam_core.variants import VariantName, default_checkpoint

_HQ_SAM_BASE_URL = "https://huggingface.co/lkeab/hq-sam/resolve/main"
_SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything"
_CHUNK_BYTES = 1 << 20
# Per socket operation, so a slow but live multi-GB transfer is never cut off.
_NETWORK_TIMEOUT_S = 60.0
# The Python API's words: the CLI's users pass the path with --checkpoint, callers of build_hqsam as
# its checkpoint argument.
_ZOO_ADVICE = "download it elsewhere and pass the file's path as checkpoint, or set HQSAM_ZOO_URL to a mirror"
_URL_ADVICE = "download it elsewhere and pass the file's path as checkpoint"
_COPY_ADVICE = "copy it elsewhere and pass the file's path as checkpoint"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")
PIN_MARK = "#sha256="
ZOO_PINS_ENV = "HQSAM_ZOO_SHA256"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RECORD_SUFFIX = ".sha256"
# This process's known digests, by file version (path, size, mtime, inode): one hash per file version.
_known_digests: dict[tuple, str] = {}
_warned_plain_http: set[str] = set()

_log = logging.getLogger(__name__)


class CheckpointSourceError(HqsamError, RuntimeError):
    """A checkpoint source could not be turned into a verified local file."""


@dataclass(frozen=True)
class ZooEntry:
    """An official checkpoint file and what it contains."""

    name: str
    filename: str
    size: int
    url: str
    sha256_prefix: str | None
    variant: VariantName
    has_hq_head: bool

    def download_url(self) -> str:
        """The official URL, or the file on the `HQSAM_ZOO_URL` mirror when that is set."""
        mirror = os.environ.get("HQSAM_ZOO_URL")
        return f"{mirror.rstrip('/')}/{self.filename}" if mirror else self.url


def _hq_sam(variant: VariantName, size: int) -> ZooEntry:
    name = default_checkpoint(variant)
    filename = f"{name}.pth"
    return ZooEntry(name, filename, size, f"{_HQ_SAM_BASE_URL}/{filename}", None, variant, True)


def _plain_sam(variant: VariantName, filename: str, size: int) -> ZooEntry:
    # torch.hub convention: the hex suffix of the file name is the start of the file's sha256.
    sha256_prefix = filename.removesuffix(".pth").rsplit("_", 1)[1]
    url = f"{_SAM_BASE_URL}/{filename}"
    return ZooEntry(f"sam_{variant}", filename, size, url, sha256_prefix, variant, False)


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        _hq_sam("vit_b", 379_335_069),
        _hq_sam("vit_l", 1_254_865_805),
        _hq_sam("vit_h", 2_570_940_653),
        _hq_sam("vit_tiny", 42_526_881),
        _plain_sam("vit_b", "sam_vit_b_01ec64.pth", 375_042_383),
        _plain_sam("vit_l", "sam_vit_l_0b3195.pth", 1_249_524_607),
        _plain_sam("vit_h", "sam_vit_h_4b8939.pth", 2_564_550_879),
    )
}


def is_zoo_name(source: str) -> bool:
    """Whether `source` names an entry of the checkpoint zoo."""
    return source in ZOO


def zoo_entry(name: str) -> ZooEntry:
    """The zoo entry called `name`."""
    try:
        return ZOO[name]
    except KeyError:
        known = ", ".join(sorted(ZOO))
        raise CheckpointSourceError(f"Unknown zoo checkpoint {name!r}; known names are {known}.") from None


def cache_dir() -> Path:
    """Where fetched checkpoints are kept: `HQSAM_CACHE`, default `~/.cache/hqsam`."""
    return Path(os.environ.get("HQSAM_CACHE") or "~/.cache/hqsam").expanduser()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_checkpoint(source: str, *, progress: bool = True) -> Path:
    """Return a local file holding the checkpoint `source` names, downloading or copying it when needed.

    `source` is a zoo name, an http(s) URL, a local path or `file://` URI, or any other fsspec URI,
    optionally pinned (`SOURCE#sha256=HEX`). Raises CheckpointSourceError, with a one-sentence
    message, on any failure, a pinned file of another sha256 included.
    """
    source, pin = split_pin(source)
    if is_zoo_name(source):
        return _fetch_zoo(ZOO[source], progress, pin)
    pins = [pin] if pin else []
    parts = urllib.parse.urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_url(source, progress, pins)
    if scheme == "file":
        return _existing_file(Path(urllib.request.url2pathname(parts.path)), pins)
    if scheme:
        return _fetch_fsspec(source, progress, pins)
    return _existing_file(Path(source).expanduser(), pins)


def split_pin(source: str) -> tuple[str, str | None]:
    """`SOURCE#sha256=HEX` -> (SOURCE, HEX); a source without a pin -> (source, None)."""
    head, mark, tail = source.rpartition(PIN_MARK)
    if mark and _SHA256.fullmatch(tail.lower()):
        return head, tail.lower()
    return source, None


def pinned(source: str, sha256: str | None) -> str:
    """`source` pinned to `sha256` (`SOURCE#sha256=HEX`), or as it is without one.

    A local path is made absolute: a pinned path is no file name, and the run's workers need not
    share this process's working directory."""
    if sha256 is None:
        return source
    pin = checked_sha256(sha256, "--checkpoint-sha256")
    if is_random_weights(source):
        raise CheckpointSourceError("Random weights have no file whose sha256 could be pinned.")
    bare, existing = split_pin(source)
    if existing is not None and existing != pin:
        raise CheckpointSourceError(f"{shown_source(bare)} is pinned twice, to {existing} and to {pin}.")
    if not is_zoo_name(bare) and "://" not in bare:
        bare = os.path.abspath(os.path.expanduser(bare))
    return f"{bare}{PIN_MARK}{pin}"


def checked_sha256(text: str, what: str) -> str:
    """`text` as a lowercase sha256 hex digest; CheckpointSourceError naming `what` otherwise."""
    digest = text.strip().lower()
    if not _SHA256.fullmatch(digest):
        raise CheckpointSourceError(f"{what} {text!r} is no sha256: 64 hexadecimal digits expected.")
    return digest


def shown_source(source: str) -> str:
    """A checkpoint source as messages show it: without its pin, credentials and signatures."""
    return storage.redact(split_pin(source)[0])


def zoo_pins() -> dict[str, str]:
    """The zoo files pinned by HQSAM_ZOO_SHA256 (`NAME=HEX`, separated by commas or spaces)."""
    pins = {}
    for item in os.environ.get(ZOO_PINS_ENV, "").replace(",", " ").split():
        name, _, digest = item.partition("=")
        if name not in ZOO:
            known = ", ".join(sorted(ZOO))
            raise CheckpointSourceError(
                f"{ZOO_PINS_ENV} names {name!r}, no zoo file; known names are {known}."
            )
        pins[name] = checked_sha256(digest, f"{ZOO_PINS_ENV} {name}")
    return pins


def file_sha256(path: Path) -> str:
    """The sha256 of a file: remembered per file version in this process, read from the record a
    download left beside it when the file has not changed since, else computed."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _known_digests:
        _known_digests[key] = _recorded_sha256(path, stat) or sha256_file(path)
    return _known_digests[key]


def _existing_file(path: Path, pins: list[str]) -> Path:
    if not path.is_file():
        raise CheckpointSourceError(
            f"Checkpoint file {path} does not exist; pass an existing file, a URL, or a zoo name "
            f"({', '.join(sorted(ZOO))})."
        )
    _check_pins(path, pins, f"Checkpoint {path}", "pass the file the pin names or correct the pin")
    return path


def _fetch_zoo(entry: ZooEntry, progress: bool, pin: str | None) -> Path:
    dest = cache_dir() / entry.filename
    pins = [digest for digest in (pin, zoo_pins().get(entry.name)) if digest is not None]
    # Size only, unless pinned: a pin is checked against the sha256 recorded at download.
    if not _is_complete(dest, entry.size):
        _download(
            entry.download_url(),
            dest,
            label=entry.name,
            expected_size=entry.size,
            sha256_prefix=entry.sha256_prefix,
            pins=pins,
            advice=_ZOO_ADVICE,
            progress=progress,
        )
    else:
        _check_cached(dest, entry.name, pins)
    return dest


def _fetch_url(url: str, progress: bool, pins: list[str]) -> Path:
    dest = _source_cache_path(url)
    # Only verified downloads are renamed into place, so an existing file is complete; no request needed.
    if not dest.is_file():
        _download(
            url,
            dest,
            label=_source_basename(url),
            expected_size=None,
            sha256_prefix=None,
            pins=pins,
            advice=_URL_ADVICE,
            progress=progress,
        )
    else:
        _check_cached(dest, _source_basename(url), pins)
    return dest


def _fetch_fsspec(uri: str, progress: bool, pins: list[str]) -> Path:
    dest = _source_cache_path(uri)
    shown = _redact(uri)
    advice = _COPY_ADVICE
    try:
        filesystem, remote_path = storage.url_to_fs(uri)
        remote_size = filesystem.size(remote_path)
    except Exception as err:  # each fsspec backend raises its own error types (botocore, gcsfs, ...)
        raise CheckpointSourceError(f"Could not read {shown} ({_reason(err)}); {advice}.") from err
    if _is_complete(dest, remote_size):
        _check_cached(dest, dest.name, pins)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(dest):
        if _is_complete(dest, remote_size):
            _check_cached(dest, dest.name, pins)
            return dest
        _log.info("Copying %s to %s", shown, dest)
        try:
            # The copy appears at dest only whole, of the announced size and of the pinned sha256.
            with storage.atomic_writer(str(dest)) as out:
                copied, digest = _copy_stream(filesystem, remote_path, out, dest.name, remote_size, progress)
                if remote_size is not None and copied != remote_size:
                    raise CheckpointSourceError(
                        f"Could not copy {shown} (got {copied} bytes, expected {remote_size}); "
                        f"the partial file was discarded; {advice}."
                    )
                _refuse_unpinned(digest, pins, f"Could not copy {shown}", f"the copy was discarded; {advice}")
        except CheckpointSourceError:
            raise
        except Exception as err:  # see above: backend-specific error types
            raise CheckpointSourceError(f"Could not copy {shown} ({_reason(err)}); {advice}.") from err
        _record_sha256(dest, digest, pins, label=dest.name)
    return dest


def _copy_stream(
    filesystem, remote_path: str, out, label: str, size: int | None, progress: bool
) -> tuple[int, str]:
    """Stream a remote object into `out` with a progress bar; the bytes copied and their sha256."""
    copied = 0
    digest = hashlib.sha256()
    with filesystem.open(remote_path, "rb") as source, _progress_bar(label, size, 0, progress) as bar:
        while chunk := source.read(_CHUNK_BYTES):
            out.write(chunk)
            digest.update(chunk)
            copied += len(chunk)
            bar.update(len(chunk))
    return copied, digest.hexdigest()


def _check_pins(path: Path, pins: list[str], what: str, advice: str) -> None:
    if pins:
        _refuse_unpinned(file_sha256(path), pins, what, advice)


def _check_cached(dest: Path, label: str, pins: list[str]) -> None:
    advice = f"delete {dest} to download it again, or correct the pin"
    _check_pins(dest, pins, f"The cached {label}", advice)


def _refuse_unpinned(digest: str, pins: list[str], what: str, advice: str) -> None:
    """CheckpointSourceError unless `digest` is every pin."""
    for pin in pins:
        if digest != pin:
            raise CheckpointSourceError(f"{what} has sha256 {digest}, not the pinned {pin}; {advice}.")


def _record_sha256(
    dest: Path, digest: str, pins: list[str], *, label: str, zoo_name: str | None = None
) -> None:
    """Record a new cache file's sha256 beside it and print it, with how to pin it when it is not."""
    stat = dest.stat()
    storage.write_bytes(str(dest) + _RECORD_SUFFIX, f"{digest} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    if pins:
        hint = "as pinned"
    else:
        hint = f"pin it with --checkpoint-sha256 {digest}" + (
            f" or {ZOO_PINS_ENV}={zoo_name}={digest}" if zoo_name else f", or SOURCE{PIN_MARK}{digest}"
        )
    print(f"{label}: sha256 {digest} ({hint})", file=sys.stderr)


def _recorded_sha256(path: Path, stat: os.stat_result) -> str | None:
    """The sha256 a download recorded beside `path`, if the file is still the one recorded."""
    try:
        digest, size, mtime_ns = Path(str(path) + _RECORD_SUFFIX).read_text().split()
    except (OSError, ValueError):
        return None
    if _SHA256.fullmatch(digest) and (size, mtime_ns) == (str(stat.st_size), str(stat.st_mtime_ns)):
        return digest
    return None


def _download(
    url: str,
    dest: Path,
    *,
    label: str,
    expected_size: int | None,
    sha256_prefix: str | None,
    pins: list[str],
    advice: str,
    progress: bool,
) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(dest):
        # Another process may have finished this file while we waited for the lock.
        if _is_complete(dest, expected_size):
            _check_cached(dest, label, pins)
            return
        part = _part_path(dest)
        _warn_plain_http(url, label)
        _log.info("Downloading %s from %s to %s", label, _redact(url), dest)
        _stream_to_part(url, part, label=label, expected_size=expected_size, advice=advice, progress=progress)
        digest = sha256_file(part)
        if sha256_prefix is not None and not digest.startswith(sha256_prefix):
            part.unlink()
            raise _download_error(
                label,
                url,
                f"sha256 {digest[:12]}... does not start with {sha256_prefix}",
                f"the partial file was discarded; {advice}",
            )
        try:
            _refuse_unpinned(digest, pins, f"{label} from {_redact(url)}", f"it was discarded; {advice}")
        except CheckpointSourceError:
            part.unlink()  # a file of another sha256 never enters the cache, not even to resume
            raise
        os.replace(part, dest)
        _record_sha256(dest, digest, pins, label=label, zoo_name=label if label in ZOO else None)


def _warn_plain_http(url: str, label: str) -> None:
    """One warning line per URL and process: plain http can be altered on the way."""
    shown = _redact(url)
    if urllib.parse.urlsplit(url).scheme.lower() == "http" and shown not in _warned_plain_http:
        _warned_plain_http.add(shown)
        print(
            f"warning: {label} comes over plain http ({shown}), which anyone on the way can alter: "
            "use https, or pin its sha256 (--checkpoint-sha256, or HQSAM_ZOO_SHA256 for a mirror)",
            file=sys.stderr,
        )


def _stream_to_part(
    url: str, part: Path, *, label: str, expected_size: int | None, advice: str, progress: bool
) -> None:
    """Download `url` into `part`, continuing what is already there when the server allows it."""
    response, offset = _open_resumable(url, part, label, advice)
    with response:
        total = _announced_total(response, offset)
        if expected_size is not None and total is not None and total != expected_size:
            part.unlink(missing_ok=True)
            raise _download_error(
                label,
                url,
                f"the server announced {total} bytes, expected {expected_size}",
                f"the partial file was discarded; {advice}",
            )
        try:
            with (
                open(part, "ab" if offset else "wb") as out,
                _progress_bar(label, total, offset, progress) as bar,
            ):
                while chunk := response.read(_CHUNK_BYTES):
                    out.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            raise _download_error(label, url, _reason(err), f"run again to resume, or {advice}") from err
    received = part.stat().st_size
    if total is not None and received < total:
        # The connection ended early: keep the bytes so that the next attempt resumes.
        raise _download_error(
            label,
            url,
            f"connection closed after {received} of {total} bytes",
            f"run again to resume, or {advice}",
        )
    if expected_size is not None and received != expected_size:
        part.unlink()
        raise _download_error(
            label,
            url,
            f"got {received} bytes, expected {expected_size}",
            f"the partial file was discarded; {advice}",
        )


def _open_resumable(url: str, part: Path, label: str, advice: str) -> tuple[http.client.HTTPResponse, int]:
    """Open `url`, asking only for the bytes `part` lacks; return the response and where its body starts."""
    offset = part.stat().st_size if part.is_file() else 0
    try:
        response = urllib.request.urlopen(_request(url, offset), timeout=_NETWORK_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        err.close()
        if offset and err.code == 416:
            # The leftover is as long as the file or longer, so it cannot be continued.
            part.unlink()
            return _open_resumable(url, part, label, advice)
        raise _download_error(label, url, _reason(err), advice) from err
    except (OSError, http.client.HTTPException) as err:
        raise _download_error(label, url, _reason(err), advice) from err
    if response.status != 206:
        # Servers that ignore Range answer 200 with the whole file: start over.
        return response, 0
    if offset and _range_start(response) != offset:
        response.close()
        part.unlink()
        return _open_resumable(url, part, label, advice)
    return response, offset


def _request(url: str, offset: int) -> urllib.request.Request:
    parts = urllib.parse.urlsplit(url)
    # urllib cannot use user:password@ in the URL itself; send it as Basic auth instead.
    host = parts.netloc.rpartition("@")[2]
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host)))
    request.add_header("User-Agent", "hqsam")
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        # Unredirected: credentials for the mirror must not follow a redirect to another host.
        request.add_unredirected_header("Authorization", f"Basic {token}")
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    return request


def _range_start(response: http.client.HTTPResponse) -> int | None:
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    return int(match[1]) if match else None


def _announced_total(response: http.client.HTTPResponse, offset: int) -> int | None:
    """The full file size the server announced, or None when it did not say."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if match and match[2] != "*":
        return int(match[2])
    length = response.headers.get("Content-Length", "").strip()
    return offset + int(length) if length.isdigit() else None


def _download_error(label: str, url: str, reason: str, advice: str) -> CheckpointSourceError:
    return CheckpointSourceError(f"Could not download {label} from {_redact(url)} ({reason}); {advice}.")


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code}"
    if isinstance(err, urllib.error.URLError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _redact(url: str) -> str:
    """`url` without user info, query or fragment, which may carry credentials."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _source_basename(source: str) -> str:
    return Path(urllib.parse.unquote(urllib.parse.urlsplit(source).path)).name or "checkpoint"


def _source_cache_path(source: str) -> Path:
    key = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()[:16]
    return cache_dir() / "urls" / f"{key}-{_source_basename(source)}"


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _is_complete(path: Path, size: int | None) -> bool:
    return path.is_file() and (size is None or path.stat().st_size == size)


@contextlib.contextmanager
def _exclusive_lock(dest: Path) -> Iterator[None]:
    """Serialise work on `dest` across processes of this machine, e.g. several Ray actors."""
    # flock locks belong to the open file, so this also excludes other threads of this process.
    # The lock file stays: deleting it would let a waiter lock an unlinked inode.
    with open(dest.with_name(dest.name + ".lock"), "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log.info("Waiting for another process to finish %s", dest)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def _progress_bar(label: str, total: int | None, initial: int, enabled: bool) -> tqdm:
    # disable=None lets tqdm switch itself off when stderr is not a terminal, keeping cluster logs clean.
    return tqdm(
        total=total,
        initial=initial,
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=None if enabled else True,
    )
