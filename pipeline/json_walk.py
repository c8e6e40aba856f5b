"""Walk a JSON file of any size in bounded memory, with orjson doing all the parsing.

The root object's values are parsed one at a time, and an array's elements a window of bytes at a
time: a window is cut at a comma that likely ends an element (after `}`), and orjson parsing the
bytes up to it as `[...]` proves the guess (a cut inside a string or a nested value never parses).
When the guess fails, numpy finds the exact top-level commas and closing bracket of the window
(strings and escapes accounted for). Every byte of the file is parsed by orjson exactly once, so a
file is accepted exactly when `orjson.loads` accepts it, and values read the same as there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

WINDOW = 2 * 2**20  # bytes of array elements parsed at a time (more for one larger element)
READ = 2**20
SPACE = b" \t\n\r"
SCALAR_END = re.compile(rb"[,}\]\s]")
STEPS = np.zeros(256, np.int8)  # per byte: 1 opens a container, -1 closes one, 2 is a comma
STEPS[[ord("["), ord("{")]] = 1
STEPS[[ord("]"), ord("}")]] = -1
STEPS[ord(",")] = 2


class BrokenJson(Exception):
    """The file is no valid JSON; the message says where, in one line."""


class NotOrjson(Exception):
    """orjson refuses what Python's json reads (NaN, Infinity, a byte-order mark): read it whole."""


@dataclass
class Piece:
    """One step of the walk: a root-level `key` (None for a root array) and what came of it.

    kind "value": `value` is the whole parsed value (not an array); "open": an array starts;
    "items": `value` lists the next elements, from byte `start` to `end` of the file; "close"."""

    key: str | None
    kind: str
    value: Any = None
    start: int = 0
    end: int = 0


class _Buffer:
    """The bytes of a file from offset `offset` on, read ahead as needed."""

    def __init__(self, handle) -> None:
        self.handle, self.data, self.offset, self.eof = handle, b"", 0, False

    def fill(self, size: int) -> bytes:
        while len(self.data) < size and not self.eof:
            more = self.handle.read(max(READ, size - len(self.data)))
            self.eof = not more
            self.data += more
        return self.data

    def consume(self, count: int) -> None:
        self.data, self.offset = self.data[count:], self.offset + count

    def next_char(self) -> bytes:
        """The next byte that is no white space (b"" at the end), not consumed."""
        while True:
            data = self.fill(1)
            stripped = data.lstrip(SPACE)
            self.consume(len(data) - len(stripped))
            if stripped or self.eof:
                return stripped[:1]


def walk(handle) -> Iterator[Piece]:
    """The pieces of a JSON file whose root is an object (or an array); raises BrokenJson,
    NotOrjson for any other root."""
    buffer = _Buffer(handle)
    first = buffer.next_char()
    if first == b"[":
        buffer.consume(1)
        yield from _array(buffer, None)
    elif first == b"{":
        buffer.consume(1)
        yield from _members(buffer)
    else:
        raise NotOrjson
    if buffer.next_char():
        raise BrokenJson(f"more text after the root value at byte {buffer.offset}")


def _members(buffer: _Buffer) -> Iterator[Piece]:
    if buffer.next_char() == b"}":
        buffer.consume(1)
        return
    while True:
        if buffer.next_char() != b'"':
            raise BrokenJson(f"expected a key at byte {buffer.offset}")
        key = _parse(buffer, _string_end(buffer) + 1)
        if buffer.next_char() != b":":
            raise BrokenJson(f"expected ':' at byte {buffer.offset}")
        buffer.consume(1)
        if buffer.next_char() == b"[":
            buffer.consume(1)
            yield from _array(buffer, key)
        else:
            yield Piece(key, "value", _parse(buffer, _value_end(buffer)))
        char = buffer.next_char()
        buffer.consume(1)
        if char == b"}":
            return
        if char != b",":
            raise BrokenJson(f"expected ',' or '}}' at byte {buffer.offset - 1}")


def _array(buffer: _Buffer, key: str | None) -> Iterator[Piece]:
    """The elements of the array whose '[' was just consumed, a window at a time."""
    yield Piece(key, "open")
    size, after_comma = WINDOW, False
    while True:
        data = buffer.fill(size)
        guess = data.rfind(b"},") + 1
        values = _try(data[:guess]) if guess else None
        cut, closed = guess, False
        if not values:
            commas, end = _top_level(data)
            if end < 0 and not len(commas):
                if buffer.eof:
                    raise BrokenJson(f"the file ends inside an array begun before byte {buffer.offset}")
                size *= 2  # one element longer than the window
                continue
            cut, closed = (end, True) if end >= 0 else (int(commas[-1]), False)
            values = _checked(data[:cut], buffer.offset)
        if not values and (after_comma or not closed):
            raise BrokenJson(f"expected a value at byte {buffer.offset + cut}")
        yield Piece(key, "items", values, buffer.offset, buffer.offset + cut)
        buffer.consume(cut + 1)
        if closed:
            yield Piece(key, "close")
            return
        size, after_comma = WINDOW, True


def _try(text: bytes) -> list | None:
    try:
        return orjson.loads(b"[" + text + b"]")
    except orjson.JSONDecodeError:
        return None


def _checked(text: bytes, offset: int) -> list:
    """`text` (elements between commas) parsed; what only Python's json reads raises NotOrjson."""
    values = _try(text)
    if values is not None:
        return values
    try:
        json.loads(b"[" + text + b"]")
    except (ValueError, RecursionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BrokenJson(f"{reason}, in the text from byte {offset}") from None
    raise NotOrjson


def _parse(buffer: _Buffer, end: int):
    """The value in the next `end` bytes, consumed."""
    values = _checked(buffer.data[:end], buffer.offset)
    if len(values) != 1:
        raise BrokenJson(f"expected one value at byte {buffer.offset}")
    buffer.consume(end)
    return values[0]


def _string_end(buffer: _Buffer) -> int:
    """The offset in the buffer of the quote that closes the string starting there."""
    at = 1
    while True:
        data = buffer.fill(at + READ)
        at = data.find(b'"', at)
        if at < 0:
            if buffer.eof:
                raise BrokenJson(f"the file ends inside a string begun at byte {buffer.offset}")
            at = len(data)
            continue
        if (at - len(data[:at].rstrip(b"\\"))) % 2 == 0:
            return at
        at += 1


def _value_end(buffer: _Buffer) -> int:
    """How many bytes the value (no array) starting at the buffer's start takes."""
    first = buffer.data[:1]
    if first == b'"':
        return _string_end(buffer) + 1
    if first == b"{":
        size = WINDOW
        while True:
            data = buffer.fill(size)
            _commas, end = _top_level(data[1:])
            if end >= 0:
                return end + 2
            if buffer.eof:
                raise BrokenJson(f"the file ends inside an object begun at byte {buffer.offset}")
            size *= 2
    while True:
        data = buffer.fill(len(buffer.data) + 1)
        found = SCALAR_END.search(data)
        if found or buffer.eof:
            return found.start() if found else len(data)


def _top_level(data: bytes) -> tuple[np.ndarray, int]:
    """For `data` starting inside an array or object, outside any string: the offsets of its
    top-level commas, and of the bracket that closes it (-1 when not in `data`)."""
    text = np.frombuffer(data, np.uint8)
    quotes = np.flatnonzero(text == ord('"'))
    if len(quotes) and (text == ord("\\")).any():
        quotes = quotes[_unescaped(text, quotes)]
    steps = STEPS[text]
    marks = np.flatnonzero(steps)
    marks = marks[np.searchsorted(quotes, marks) % 2 == 0]  # outside strings
    kinds = steps[marks]
    depth = np.cumsum(np.where(kinds == 2, 0, kinds))
    closing = np.flatnonzero(depth < 0)
    end = int(marks[closing[0]]) if len(closing) else -1
    commas = marks[(kinds == 2) & (depth == 0)]
    return (commas[commas < end] if end >= 0 else commas), end


def _unescaped(text: np.ndarray, quotes: np.ndarray) -> np.ndarray:
    """Which quotes end (or start) a string: those after an even run of backslashes."""
    plain = np.concatenate([[-1], np.flatnonzero(text != ord("\\"))])
    before = plain[np.searchsorted(plain, quotes) - 1]
    return (quotes - 1 - before) % 2 == 0
