"""QMP messages on the wire: input framing and output encoding (layer 5).

Input (client -> server) is **not** line-framed (../shared/spec/QMP.md §1):
QEMU feeds raw bytes to an incremental JSON parser and a message ends when
its top-level value closes.  ``qemu.qmp`` sends compact JSON with no
terminator at all and pipelines requests, so one ``read()`` may carry
several requests, or a part of one.  :class:`JSONStreamParser` does the
same as QEMU's json-streamer:

* a small scanner finds where each top-level value ends (``{}``/``[]``
  depth outside strings, string escapes honoured, whitespace between values
  skipped); the complete value is then decoded with
  :meth:`json.JSONDecoder.raw_decode`;
* the partial message is kept in a **bounded** buffer: a message longer
  than ``max_size`` bytes, or nested deeper than ``max_depth``, yields one
  :class:`Malformed` item and the rest of it is skipped without being
  stored (the scanner keeps tracking its structure to find its end);
* an ASCII control character other than TAB/CR/LF, or one of the bytes
  ``0xFE``/``0xFF`` (impossible in UTF-8), resets the parser: the partial
  message is dropped and a :class:`Malformed` item reported, as QEMU does
  (clients use this to resynchronise);
* malformed JSON, invalid UTF-8, ``NaN``/``Infinity`` and duplicate keys
  give :class:`Malformed` too.  Parsing goes on with the next message.

Output (server -> client): one compact JSON object per line, ASCII only,
terminated by CRLF (:func:`encode`), never pretty-printed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "MAX_MESSAGE_SIZE",
    "JSONStreamParser",
    "Malformed",
    "Parsed",
    "encode",
]

#: Default bound of one input message, bytes (QEMU allows 64 MiB of tokens;
#: no QMP request we serve comes near 1 MiB).
MAX_MESSAGE_SIZE = 1 << 20
#: Deepest nesting accepted (QEMU's json-streamer: 1024).
MAX_DEPTH = 1024

_WS = b" \t\r\n"
# Bytes that reset the parser: C0 controls except TAB, LF, CR; 0xFE, 0xFF.
_RESET_BYTES = bytes([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0xFE, 0xFF])
_RESET_CLASS = b"".join(b"\\x%02x" % b for b in _RESET_BYTES)
# Inside a string: the end quote, an escape, or a reset byte.
_IN_STRING = re.compile(rb'["\\' + _RESET_CLASS + rb"]")
# Inside a container, outside strings: what changes the scanner's state.
_IN_CONTAINER = re.compile(rb'["{}\[\]' + _RESET_CLASS + rb"]")
# A bare top-level token (number, keyword, garbage) ends at one of these.
_TOKEN_END = re.compile(rb'[ \t\r\n{}\[\]",:' + _RESET_CLASS + rb"]")


@dataclass(frozen=True)
class Parsed:
    """One complete, well-formed JSON value (any type: the caller checks)."""

    value: Any


@dataclass(frozen=True)
class Malformed:
    """Input that could not be parsed; ``desc`` is QEMU-style
    (``JSON parse error, ...``).  Its reply carries no ``id``."""

    desc: str


Item = Parsed | Malformed


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key '{key}'")
        out[key] = value
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_reject_constant)


def decode(blob: bytes) -> Item:
    """Decode exactly one JSON value (surrounding whitespace allowed)."""
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        return Malformed("JSON parse error, invalid UTF-8 sequence")
    start = len(text) - len(text.lstrip())
    try:
        value, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        return Malformed(f"JSON parse error, {exc.msg.lower()}")
    except (ValueError, RecursionError) as exc:
        return Malformed(f"JSON parse error, {exc}")
    if text[end:].strip():
        return Malformed("JSON parse error, trailing characters")
    return Parsed(value)


def _stray(byte: int) -> Malformed:
    return Malformed(f"JSON parse error, stray '\\x{byte:02x}'")


class JSONStreamParser:
    """Split a byte stream into JSON values, incrementally (module docstring).

    :param max_size: longest message kept, bytes.
    :param max_depth: deepest nesting accepted.

    Feed it whatever ``read()`` returned; it yields an item for every
    message that ended in the data seen so far.
    """

    def __init__(
        self, max_size: int = MAX_MESSAGE_SIZE, max_depth: int = MAX_DEPTH
    ) -> None:
        if max_size < 2 or max_depth < 1:
            raise ValueError("max_size must be >= 2 and max_depth >= 1")
        self.max_size = max_size
        self.max_depth = max_depth
        self._buf = bytearray()  # the partial message (not in skip mode)
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._bare = False  # inside a bare top-level token
        self._started = False  # a message has begun
        self._skip = False  # oversize / too deep: discard until it ends
        self._errors: list[Malformed] = []  # found by _scan, yielded by _feed

    @property
    def pending(self) -> int:
        """Bytes of the partial message held (0 between messages)."""
        return len(self._buf)

    def _reset(self) -> None:
        self._buf.clear()
        self._depth = 0
        self._in_string = self._escape = self._bare = False
        self._started = self._skip = False

    def feed(self, data: bytes) -> list[Item]:
        """Consume ``data``; return the items of every message it completed."""
        return list(self._feed(bytes(data)))  # no copy of a bytes object

    def _feed(self, data: bytes) -> Iterator[Item]:
        pos = 0
        n = len(data)
        while pos < n:
            if not self._started:
                # Between messages: skip whitespace, look at the first byte.
                while pos < n and data[pos] in _WS:
                    pos += 1
                if pos >= n:
                    return
                first = data[pos]
                if first in _RESET_BYTES:
                    pos += 1
                    yield _stray(first)
                    continue
                if first in b"}],:":
                    pos += 1
                    yield Malformed(f"JSON parse error, stray '{chr(first)}'")
                    continue
                self._started = True
                if first in b"{[":
                    self._depth = 1
                    self._append(data[pos : pos + 1])
                    pos += 1
                elif first == ord('"'):
                    self._in_string = True
                    self._append(data[pos : pos + 1])
                    pos += 1
                else:
                    self._bare = True
                continue
            start = pos
            end, reset = self._scan(data, pos)
            yield from self._errors
            self._errors.clear()
            if reset is not None:
                # A reset byte: drop the partial message, report once.
                self._reset()
                yield _stray(reset[0])
                pos = reset[1] + 1
                continue
            if end < 0:  # the message goes on beyond this chunk
                yield from self._append_checked(data[start:])
                return
            yield from self._append_checked(data[start:end])
            pos = end
            item = self._finish()
            if item is not None:
                yield item

    def _append(self, chunk: bytes) -> None:
        if not self._skip:
            self._buf += chunk

    def _append_checked(self, chunk: bytes) -> Iterator[Item]:
        """Keep ``chunk``; the first time the bound is crossed, report it."""
        if self._skip:
            return
        if len(self._buf) + len(chunk) > self.max_size:
            self._skip = True
            self._buf.clear()
            yield Malformed(
                f"JSON parse error, message exceeds the size limit of "
                f"{self.max_size} bytes"
            )
            return
        self._buf += chunk

    def _finish(self) -> Item | None:
        """The message that just ended: decode it (unless it was skipped)."""
        skipped = self._skip
        blob = bytes(self._buf)
        self._reset()
        if skipped:
            return None  # reported when the bound was crossed
        return decode(blob)

    def _scan(self, data: bytes, pos: int) -> tuple[int, tuple[int, int] | None]:
        """Advance the scanner over ``data[pos:]``.

        :returns: ``(end, None)`` with ``end`` just past the message's last
            byte, ``(-1, None)`` if it does not end in ``data``, or
            ``(-1, (byte, index))`` when a reset byte was met.
        """
        n = len(data)
        if self._bare:
            m = _TOKEN_END.search(data, pos)
            if m is None:
                return -1, None
            self._bare = False
            end = m.start()
            if data[end] in _RESET_BYTES:
                return -1, (data[end], end)
            return end, None
        while pos < n:
            if self._in_string:
                if self._escape:
                    self._escape = False
                    if data[pos] in _RESET_BYTES:
                        return -1, (data[pos], pos)
                    pos += 1
                    continue
                m = _IN_STRING.search(data, pos)
                if m is None:
                    return -1, None
                c = data[m.start()]
                pos = m.end()
                if c == ord("\\"):
                    self._escape = True
                elif c == ord('"'):
                    self._in_string = False
                    if self._depth == 0:
                        return pos, None  # a top-level string ended
                else:
                    return -1, (c, m.start())
                continue
            m = _IN_CONTAINER.search(data, pos)
            if m is None:
                return -1, None
            c = data[m.start()]
            pos = m.end()
            if c == ord('"'):
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
                if self._depth > self.max_depth and not self._skip:
                    self._skip = True
                    self._buf.clear()
                    self._errors.append(
                        Malformed(
                            f"JSON parse error, nesting deeper than {self.max_depth}"
                        )
                    )
            elif c in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    return pos, None
            else:
                return -1, (c, m.start())
        return -1, None


def encode(message: dict[str, Any]) -> bytes:
    """One output message: compact-enough JSON (QEMU's ``": "``/``", "``
    separators), ASCII only, one line, CRLF-terminated."""
    return json.dumps(message, ensure_ascii=True, allow_nan=False).encode() + b"\r\n"
