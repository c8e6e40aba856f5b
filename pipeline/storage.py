"""Object storage behind fsspec: local paths, file://, s3://, gs://, https://.

S3 honours the standard AWS variables (credentials, AWS_ENDPOINT_URL for MinIO-style endpoints)
through botocore; nothing here logs credentials.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

TRANSIENT_ERRORS = (ConnectionError, TimeoutError, OSError)


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
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


def read_bytes(uri: str, *, attempts: int = 4, backoff_s: float = 0.5) -> bytes:
    """Read a whole object, retrying transient errors; a missing object raises FileNotFoundError at once."""
    for attempt in range(attempts):
        try:
            fs, path = url_to_fs(uri)
            with fs.open(path, "rb") as handle:
                return handle.read()
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except TRANSIENT_ERRORS:
            if attempt == attempts - 1:
                raise
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object that readers see whole or not at all: locally a hidden temp file renamed
    into place, on an object store one upload (committed when it closes)."""
    fs, path = url_to_fs(uri)
    if is_local(fs):
        directory, name = os.path.split(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        temp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")  # dot-files: unseen by readers
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    else:
        with fs.open(path, "wb") as handle:
            handle.write(data)


def write_json(uri: str, payload: dict) -> None:
    """`write_bytes` of indented JSON; numpy scalars become plain numbers."""
    write_bytes(uri, json.dumps(payload, indent=2, default=json_scalar).encode())


def json_scalar(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
