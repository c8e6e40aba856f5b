"""Turn any checkpoint source (zoo name, URL, fsspec URI or local path) into a verified local file."""

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
from hqsam.hqsam_core.variants import VariantName, default_checkpoint

_HQ_SAM_BASE_URL = "https://huggingface.co/lkeab/hq-sam/resolve/main"
_SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything"
_CHUNK_BYTES = 1 << 20
# Per socket operation, so a slow but live multi-GB transfer is never cut off.
_NETWORK_TIMEOUT_S = 60.0
_ZOO_ADVICE = "download it elsewhere and pass --checkpoint PATH, or set HQSAM_ZOO_URL to a mirror"
_URL_ADVICE = "download it elsewhere and pass --checkpoint PATH"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")

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

    `source` is a zoo name, an http(s) URL, a local path or `file://` URI, or any other fsspec URI.
    Raises CheckpointSourceError, with a one-sentence message, on any failure.
    """
    if is_zoo_name(source):
        return _fetch_zoo(ZOO[source], progress)
    parts = urllib.parse.urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_url(source, progress)
    if scheme == "file":
        return _existing_file(Path(urllib.request.url2pathname(parts.path)))
    if scheme:
        return _fetch_fsspec(source, progress)
    return _existing_file(Path(source).expanduser())


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointSourceError(
            f"Checkpoint file {path} does not exist; pass an existing file, a URL, or a zoo name "
            f"({', '.join(sorted(ZOO))})."
        )
    return path


def _fetch_zoo(entry: ZooEntry, progress: bool) -> Path:
    dest = cache_dir() / entry.filename
    # Size only: hashing a multi-GB file on every start is too slow, and the hash was checked on download.
    if not _is_complete(dest, entry.size):
        _download(
            entry.download_url(),
            dest,
            label=entry.name,
            expected_size=entry.size,
            sha256_prefix=entry.sha256_prefix,
            advice=_ZOO_ADVICE,
            progress=progress,
        )
    return dest


def _fetch_url(url: str, progress: bool) -> Path:
    dest = _source_cache_path(url)
    # Only verified downloads are renamed into place, so an existing file is complete; no request needed.
    if not dest.is_file():
        _download(
            url,
            dest,
            label=_source_basename(url),
            expected_size=None,
            sha256_prefix=None,
            advice=_URL_ADVICE,
            progress=progress,
        )
    return dest


def _fetch_fsspec(uri: str, progress: bool) -> Path:
    dest = _source_cache_path(uri)
    shown = _redact(uri)
    advice = "copy it elsewhere and pass --checkpoint PATH"
    try:
        filesystem, remote_path = storage.url_to_fs(uri)
        remote_size = filesystem.size(remote_path)
    except Exception as err:  # each fsspec backend raises its own error types (botocore, gcsfs, ...)
        raise CheckpointSourceError(f"Could not read {shown} ({_reason(err)}); {advice}.") from err
    if _is_complete(dest, remote_size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(dest):
        if _is_complete(dest, remote_size):
            return dest
        _log.info("Copying %s to %s", shown, dest)
        try:
            # The copy appears at dest only whole and of the announced size (storage's atomic write).
            with storage.atomic_writer(str(dest)) as out:
                copied = _copy_stream(filesystem, remote_path, out, dest.name, remote_size, progress)
                if remote_size is not None and copied != remote_size:
                    raise CheckpointSourceError(
                        f"Could not copy {shown} (got {copied} bytes, expected {remote_size}); "
                        f"the partial file was discarded; {advice}."
                    )
        except CheckpointSourceError:
            raise
        except Exception as err:  # see above: backend-specific error types
            raise CheckpointSourceError(f"Could not copy {shown} ({_reason(err)}); {advice}.") from err
    return dest


def _copy_stream(filesystem, remote_path: str, out, label: str, size: int | None, progress: bool) -> int:
    """Stream a remote object into `out` with a progress bar; the number of bytes copied."""
    copied = 0
    with filesystem.open(remote_path, "rb") as source, _progress_bar(label, size, 0, progress) as bar:
        while chunk := source.read(_CHUNK_BYTES):
            out.write(chunk)
            copied += len(chunk)
            bar.update(len(chunk))
    return copied


def _download(
    url: str,
    dest: Path,
    *,
    label: str,
    expected_size: int | None,
    sha256_prefix: str | None,
    advice: str,
    progress: bool,
) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(dest):
        # Another process may have finished this file while we waited for the lock.
        if _is_complete(dest, expected_size):
            return
        part = _part_path(dest)
        _log.info("Downloading %s from %s to %s", label, _redact(url), dest)
        _stream_to_part(url, part, label=label, expected_size=expected_size, advice=advice, progress=progress)
        if sha256_prefix is not None:
            digest = sha256_file(part)
            if not digest.startswith(sha256_prefix):
                part.unlink()
                raise _download_error(
                    label,
                    url,
                    f"sha256 {digest[:12]}... does not start with {sha256_prefix}",
                    f"the partial file was discarded; {advice}",
                )
        os.replace(part, dest)


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
