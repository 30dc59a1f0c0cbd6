"""Reading a large top-level JSON object one member at a time.

``json.load`` of a half-gigabyte RL data file builds several gigabytes of Python
objects. :func:`iter_object_members` yields ``(key, value)`` pairs of the top-level
object instead, decoding one member at a time from a buffered read, so memory holds
one query's candidates rather than the whole file. Errors carry the line and column,
as ``json`` reports them.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Generator
from typing import Any, Protocol

from .errors import LeverError

_CHUNK = 1 << 20
_WS = " \t\n\r"
_NUMBER_CHARS = "0123456789.eE+-"


class Hasher(Protocol):
    """What :func:`iter_object_members` feeds the bytes it reads to (``hashlib`` objects)."""

    def update(self, data: bytes, /) -> None: ...


class _Reader:
    """A text buffer over a file that grows on demand and tracks line numbers."""

    def __init__(self, path: str | os.PathLike[str], hasher: Hasher | None = None) -> None:
        self.path = str(path)
        self.fh = open(path, "rb")  # closed by close()
        self.hasher = hasher
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.line_base = 1  # line number of buf[0]
        self.col_base = 0  # column offset of buf[0] on its line

    def close(self) -> None:
        self.fh.close()

    def more(self) -> bool:
        """Read another chunk; False at end of file. Drops consumed text first."""
        if self.eof:
            return False
        consumed = self.buf[: self.pos]
        newlines = consumed.count("\n")
        if newlines:
            self.line_base += newlines
            self.col_base = len(consumed) - consumed.rfind("\n") - 1
        else:
            self.col_base += len(consumed)
        self.buf = self.buf[self.pos :]
        self.pos = 0
        raw = self.fh.read(_CHUNK)
        if self.hasher is not None:
            self.hasher.update(raw)
        try:
            text = self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            reason = f"not UTF-8 text: {exc.reason}"
            raise LeverError(f"{self.path}: not valid JSON ({reason})") from None
        if not raw:
            self.eof = True
        self.buf += text
        return bool(raw) or bool(text)

    def where(self, pos: int) -> str:
        """``line L, column C`` of buffer position ``pos`` (1-based, like ``json``)."""
        before = self.buf[:pos]
        newlines = before.count("\n")
        if newlines:
            col = pos - before.rfind("\n")
        else:
            col = self.col_base + pos + 1
        return f"line {self.line_base + newlines}, column {col}"

    def skip_ws(self) -> str:
        """Skip whitespace; return the next character ('' at end of file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def fail(self, what: str, pos: int | None = None) -> LeverError:
        where = self.where(self.pos if pos is None else pos)
        return LeverError(f"{self.path}: not valid JSON ({what} at {where})")

    def decode_value(self, decoder: json.JSONDecoder) -> Any:
        """Decode one JSON value at the current position, reading more text as needed."""
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise self.fail("JSON nested too deeply") from None
            except json.JSONDecodeError as exc:
                # An error may just mean "read more". more() shifts the buffer even
                # when it finds nothing, so always decode again after calling it.
                if not self.eof:
                    self.more()
                    continue
                raise self.fail(exc.msg, exc.pos) from None
            # A number cut by the chunk boundary decodes short ("0." of "0.25"): trust
            # it only when followed by a character that cannot continue it.
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and (end >= len(self.buf) or self.buf[end] in _NUMBER_CHARS)
                and not self.eof
            ):
                self.more()
                continue
            self.pos = end
            return value


def _enter_object(reader: _Reader, decoder: json.JSONDecoder) -> None:
    """Step ``reader`` past the ``{`` that opens the top-level object; an empty file or
    any other top-level value (named by its type) is an error."""
    first = reader.skip_ws()
    if first == "":
        raise LeverError(f"{reader.path}: file is empty (expected a JSON object)")
    if first != "{":
        if first in "[":
            raise LeverError(
                f"{reader.path}: top level must be an object of query id -> query, found a list"
            )
        value = reader.decode_value(decoder)
        raise LeverError(
            f"{reader.path}: top level must be an object of query id -> query, "
            f"found {type(value).__name__}"
        )
    reader.pos += 1


def iter_object_members(
    path: str | os.PathLike[str], hasher: Hasher | None = None
) -> Generator[tuple[str, Any], None, None]:
    """Yield the ``(key, value)`` members of the JSON object in ``path``, in file order.

    Raises :class:`LeverError` for a file that is empty, not JSON, truncated, or whose
    top level is not an object. ``hasher`` (a ``hashlib`` object) receives every byte
    read: once the generator is exhausted it has hashed exactly the bytes that were
    parsed, the whole file (the reader checks that nothing follows the object).
    """
    reader = _Reader(path, hasher)
    decoder = json.JSONDecoder()
    try:
        _enter_object(reader, decoder)
        expect_member = True
        first_member = True
        while True:
            ch = reader.skip_ws()
            if ch == "":
                raise reader.fail("unexpected end of file: the object is not closed")
            if ch == "}" and (first_member or not expect_member):
                reader.pos += 1
                break
            if not expect_member:
                if ch != ",":
                    raise reader.fail("expected ',' or '}' between members")
                reader.pos += 1
                expect_member = True
                continue
            if ch != '"':
                raise reader.fail("expected a string key")
            key = reader.decode_value(decoder)
            if reader.skip_ws() != ":":
                raise reader.fail("expected ':' after a key")
            reader.pos += 1
            if reader.skip_ws() == "":
                raise reader.fail("unexpected end of file after a key")
            value = reader.decode_value(decoder)
            yield key, value
            expect_member = False
            first_member = False
        if reader.skip_ws() != "":
            raise reader.fail("extra data after the top-level object")
    finally:
        reader.close()
