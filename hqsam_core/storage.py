"""The one storage layer: local paths, file://, s3://, gs://, https:// behind fsspec.

Every read and write of the project goes through here: reads retry transient errors, listings never
come from a cache, whole objects appear atomically (never half an object, locally or remotely), and
URLs are redacted before anything logs or records them. S3 honours the standard AWS variables
(AWS_ENDPOINT_URL included) through botocore.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

TRANSIENT_ERRORS = (ConnectionError, TimeoutError, OSError)
READ_ATTEMPTS = 4
READ_BACKOFF_S = 0.5
# Query parameters that carry secrets in signed or tokenised URLs (S3/GCS/Azure presigning, tokens).
_SECRET_QUERY = re.compile(r"(signature|token|credential|key|secret|sig|password|auth)", re.IGNORECASE)


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of `uri`; remote listings are never cached (they decide what is done)."""
    protocol = fsspec.core.split_protocol(uri)[0]
    options = {} if protocol in (None, "file", "local") else {"use_listings_cache": False}
    try:
        return fsspec.core.url_to_fs(uri, **options)
    except TypeError:  # a filesystem without listing caches takes no such option
        return fsspec.core.url_to_fs(uri)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def has_scheme(uri: str) -> bool:
    return "://" in uri


def join(root: str, relative: str) -> str:
    """`relative` under `root`, unless it is already absolute (a URI or a /path)."""
    if has_scheme(relative) or relative.startswith("/"):
        return relative
    return posixpath.join(root.rstrip("/"), relative) if root else relative


def parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else ""


def absolute(uri: str) -> str:
    """A local path made absolute (Ray workers need not share the driver's working directory);
    URIs are returned as they are."""
    return uri if has_scheme(uri) else os.path.abspath(os.path.expanduser(uri))


def exists(uri: str) -> bool:
    fs, path = url_to_fs(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    """Read a whole object, retrying transient errors; a missing object raises FileNotFoundError at once."""
    for attempt in range(READ_ATTEMPTS):
        try:
            fs, path = url_to_fs(uri)
            with fs.open(path, "rb") as handle:
                return handle.read()
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except TRANSIENT_ERRORS:
            if attempt == READ_ATTEMPTS - 1:
                raise
            time.sleep(READ_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def list_files(uri: str, pattern: str = "*") -> list[str]:
    """URIs of the files directly in folder `uri` whose names match `pattern`, sorted; fresh from the
    store every time (never a cached listing), [] when the folder does not exist. One listing
    request per folder, not one per file."""
    fs, path = url_to_fs(uri)
    with contextlib.suppress(AttributeError):
        fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    names = (
        entry["name"]
        for entry in entries
        if entry.get("type") != "directory"
        and fnmatch.fnmatchcase(posixpath.basename(entry["name"]), pattern)
    )
    return sorted(_uri(fs, name) for name in names)


def list_folder(uri: str) -> list[str]:
    """Every entry directly in folder `uri` (files and folders), fresh; [] when it does not exist."""
    fs, path = url_to_fs(uri)
    with contextlib.suppress(AttributeError):
        fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return sorted(_uri(fs, name) for name in fs.ls(path, detail=False))


def remove(uri: str) -> None:
    fs, path = url_to_fs(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def make_folder(uri: str) -> None:
    fs, path = url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object that readers see whole or not at all."""
    with atomic_writer(uri) as handle:
        handle.write(data)


@contextlib.contextmanager
def atomic_writer(uri: str) -> Iterator[IO[bytes]]:
    """A binary handle whose content appears at `uri` only if the block ends without an error.

    Locally: a hidden temp file beside the target (dot-files are unseen by Parquet readers), fsynced
    and renamed into place. On an object store: spooled to a local temp file, then one upload after
    the block succeeded, so an error never commits a truncated object (fsspec's own writers do)."""
    fs, path = url_to_fs(uri)
    if is_local(fs):
        directory, name = os.path.split(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        temp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temp, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp)
        return
    with tempfile.NamedTemporaryFile(prefix="hqsam-upload-") as spool:
        yield spool
        spool.flush()
        fs.put_file(spool.name, path)


def move_file(local_path: str, uri: str) -> None:
    """Move a local file to `uri`, local (a rename where it can) or remote (an upload)."""
    fs, path = url_to_fs(uri)
    if is_local(fs):
        shutil.move(local_path, path)
        return
    fs.put_file(local_path, path)
    os.remove(local_path)


def write_json(uri: str, payload: dict) -> None:
    """`write_bytes` of indented JSON; numpy scalars become plain numbers."""
    write_bytes(uri, json.dumps(payload, indent=2, default=json_scalar).encode())


def read_json(uri: str):
    """`parse_json` of a whole object."""
    return parse_json(read_bytes(uri))


def parse_json(data: bytes):
    """JSON bytes -> Python objects with orjson, falling back to the standard library for the
    NaN/Infinity that Python's json.dump writes (a NaN bbox must become a row status, not a failed run)."""
    import orjson

    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def json_scalar(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def redact(uri: str | None) -> str | None:
    """`uri` safe to log or record: user:password@ and secret query or fragment parameters
    (signatures, credentials, tokens) become ***; everything else stays as written."""
    if not uri or not has_scheme(uri):
        return uri
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query, fragment = _redact_parameters(parts.query), _redact_parameters(parts.fragment)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def _redact_parameters(text: str) -> str:
    """`a=1&X-Amz-Signature=abc` -> `a=1&X-Amz-Signature=***`, each pair otherwise kept byte for byte."""
    pairs = []
    for pair in text.split("&") if text else []:
        key = urllib.parse.unquote_plus(pair.split("=", 1)[0])
        pairs.append(f"{pair.split('=', 1)[0]}=***" if _SECRET_QUERY.search(key) else pair)
    return "&".join(pairs)


def _uri(fs: fsspec.AbstractFileSystem, name: str) -> str:
    if is_local(fs):
        return name
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{name}"
