"""Read a big JSON file one entry at a time: the items of a top-level object, or the elements
of one of its arrays, each parsed alone (``json.JSONDecoder.raw_decode`` on a buffer refilled
from the file). A question file of millions of entries then never exists as one Python object:
memory holds one buffer and what the caller keeps of each entry. The file is a local path or
the URI of an object in a bucket (``s3://bucket/q.json``), streamed a range at a time.

A file that is not the expected shape raises ``ValueError`` naming the byte offset, as
``json.load`` would.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator, TextIO

from artifacts.location import is_uri, object_stream

CHUNK = 1 << 20
_DECODER = json.JSONDecoder()
_SPACE = " \t\n\r"


class _Reader:
    """A text buffer over the file: ``peek`` the next non-space character, ``value`` the next
    JSON value, ``expect`` a punctuation character."""

    def __init__(self, f, path: str):
        self.f, self.path = f, path
        self.buf, self.pos, self.offset, self.eof = "", 0, 0, False

    def _more(self) -> bool:
        if self.eof:
            return False
        chunk = self.f.read(CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.offset += self.pos
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0
        return True

    def peek(self) -> str:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _SPACE:
                self.pos += 1
            if self.pos < len(self.buf) or not self._more():
                return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise self.error(f"expected {' or '.join(repr(x) for x in chars)}, found {c!r}" if c else "unexpected end")
        self.pos += 1
        return c

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                # a value cut by the end of the buffer: read on (a number may also end there)
                if self._more():
                    continue
                raise self.error(exc.msg) from None
            if end == len(self.buf) and not self.eof and self._more():
                continue  # a number may go on in the next chunk
            self.pos = end
            return value

    def error(self, msg: str) -> ValueError:
        return ValueError(f"{self.path}: not valid JSON ({msg}: char {self.offset + self.pos})")


def _items(r: _Reader) -> Iterator[tuple[str, Any]]:
    """The items of the object whose ``{`` was just read, the value read only when asked:
    the caller reads it (``r.value()`` or ``_elements``) before asking for the next key."""
    if r.peek() == "}":
        r.pos += 1
        return
    while True:
        key = r.value()
        if not isinstance(key, str):
            raise r.error("expected a key")
        r.expect(":")
        yield key, r
        if r.expect(",}") == "}":
            return


def _elements(r: _Reader) -> Iterator[Any]:
    r.expect("[")
    if r.peek() == "]":
        r.pos += 1
        return
    while True:
        yield r.value()
        if r.expect(",]") == "]":
            return


def _text(path: str | Path) -> TextIO:
    """``path`` opened as UTF-8 text: a local file, or an object read a range at a time."""
    if isinstance(path, str) and is_uri(path):
        return io.TextIOWrapper(object_stream(path), encoding="utf-8")
    return open(Path(path).expanduser(), encoding="utf-8")


def object_items(path: str | Path, expected: str) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of the top-level object of ``path``, one at a time; ``ValueError`` saying
    ``expected`` when the top level is not an object."""
    with _text(path) as f:
        r = _Reader(f, str(path))
        if r.peek() != "{":
            r.value()  # invalid JSON is said as such
            raise ValueError(f"{path}: {expected}")
        r.pos += 1
        for key, _ in _items(r):
            yield key, r.value()


def array_entries(path: str | Path, key: str, head: dict[str, Any]) -> Iterator[Any]:
    """The elements of the top-level object's array ``key``, one at a time; the object's other
    values (small: a question file's ``info``, ``data_subtype``...) are put into ``head``. An
    object without such an array yields nothing and puts ``head[key]`` as found (absent, or
    not a list: the caller says what is wrong)."""
    with _text(path) as f:
        r = _Reader(f, str(path))
        if r.peek() != "{":
            head["_top"] = r.value()  # not an object: the caller names what it is
            return
        r.pos += 1
        for name, _ in _items(r):
            if name == key and r.peek() == "[":
                head[key] = []  # marks the array as found; its entries are yielded, not kept
                yield from _elements(r)
            else:
                head[name] = r.value()
