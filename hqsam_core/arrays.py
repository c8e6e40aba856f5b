"""numpy arrays on their way into torch."""

from __future__ import annotations

from typing import TypeVar

import numpy as np

T = TypeVar("T")


def writable(array: T) -> T:
    """`array` itself, unless it is a read-only numpy array: then a writable copy of it.

    torch.from_numpy / torch.as_tensor share an array's memory and warn once per process when it is
    read-only, as arrays backed by Arrow or Ray's object store are (e.g. images in a Ray Data batch).
    Copying only those keeps the hot path free of copies for the arrays that can be shared.
    """
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        return array.copy()
    return array
