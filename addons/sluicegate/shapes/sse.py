"""Incremental Server-Sent Events parser and serializer.

The parser keeps every event's exact bytes so an event the redactor leaves alone goes back to the
client byte-identical, and it produces the same events for any split of the input into network
chunks (the one exception, a CR at the end of a chunk followed by LF, is handled so the bytes still
concatenate identically: see `SseParser`).

Decisions, beyond the WHATWG event-stream grammar:
  * A final event without its blank line is returned as an unterminated event (`end == b""`).
    Browsers drop it, but other clients may not, so it is redacted and passed on, never lost.
  * Invalid UTF-8 fails closed with `SseInvalidUtf8`: guessing at replacement characters would
    change what the redaction rules see.
  * A UTF-8 BOM at the start of the stream is kept as the first event's `prefix`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

BOM = b"\xef\xbb\xbf"
_EOL = re.compile(rb"[\r\n]")
_TEXT_EOL = re.compile(r"\r\n|\r|\n")


class SseError(Exception):
    """Base of SSE stream failures; `code` is stable and safe to log or send to the client."""

    code = "sse_error"


class SseEventTooLarge(SseError):
    code = "sse_event_too_large"


class SseInvalidUtf8(SseError):
    code = "sse_invalid_utf8"


@dataclass(frozen=True, slots=True)
class SseLine:
    """One non-blank line. `field` is None for a comment (`value` is then all after the colon)."""

    field: str | None
    value: str
    raw: bytes  # the line as received, without its line ending
    eol: bytes  # b"\n", b"\r\n", b"\r", or b"" when the stream ended mid-line


@dataclass(frozen=True, slots=True)
class SseEvent:
    """A block of lines up to a blank line. A block without lines is a bare blank line."""

    lines: tuple[SseLine, ...]
    end: bytes  # the blank line that dispatched the block; b"" if the stream ended first
    prefix: bytes = b""  # the stream's BOM, on the first block only

    @property
    def raw(self) -> bytes:
        return self.prefix + b"".join(line.raw + line.eol for line in self.lines) + self.end

    @property
    def terminated(self) -> bool:
        return bool(self.end)

    @property
    def data(self) -> str | None:
        """The data lines joined with LF, or None if the block has no data field."""
        values = [line.value for line in self.lines if line.field == "data"]
        return "\n".join(values) if values else None

    @property
    def event(self) -> str | None:
        return self._last("event")

    @property
    def id(self) -> str | None:
        return self._last("id")

    @property
    def comments(self) -> list[str]:
        return [line.value for line in self.lines if line.field is None]

    @property
    def eol(self) -> bytes:
        """The line ending this event uses, for lines written into it."""
        for line in self.lines:
            if line.eol:
                return line.eol
        return self.end or b"\n"

    def _last(self, name: str) -> str | None:
        values = [line.value for line in self.lines if line.field == name]
        return values[-1] if values else None

    def rebuild(self, data: str | None = None, comments: Sequence[str] | None = None) -> bytes:
        """The event's bytes with its data (and/or comments) replaced, everything else kept.

        New data goes where the first data line was, one `data:` line per line of text, keeping
        that line's spacing and line ending; comments are replaced in order.
        """
        data_lines = [line for line in self.lines if line.field == "data"]
        if data is not None and not data_lines:
            raise ValueError("event has no data field to replace")
        new_comments = iter(comments) if comments is not None else None
        out = [self.prefix]
        for line in self.lines:
            if line.field is None and new_comments is not None:
                out += self._text_lines(next(new_comments), line.eol, _comment_line)
            elif line.field != "data" or data is None:
                out += [line.raw, line.eol]
            elif line is data_lines[0]:
                spaced = line.raw[5:6] == b" "
                out += self._text_lines(data, line.eol, _data_line(spaced))
        out.append(self.end)
        return b"".join(out)

    def _text_lines(self, text: str, eol: bytes, line: Callable[[str], bytes]) -> list[bytes]:
        """One line per line of `text`; `eol` b"" leaves the last unterminated (end of stream)."""
        parts = [line(part) for part in _TEXT_EOL.split(text)]
        return [part + self.eol for part in parts[:-1]] + [parts[-1] + eol]


def _data_line(spaced: bool) -> Callable[[str], bytes]:
    """A reader strips one space after the colon, so a value starting with one needs it."""
    return lambda value: (b"data: " if spaced or value[:1] == " " else b"data:") + value.encode()


def _comment_line(value: str) -> bytes:
    return b":" + value.encode()


def format_event(
    data: str, *, event: str | None = None, id: str | None = None, eol: bytes = b"\n"
) -> bytes:
    """Serialize a new event (used for events the redactor has to synthesize)."""
    out = []
    if event is not None:
        out.append(b"event: " + event.encode() + eol)
    if id is not None:
        out.append(b"id: " + id.encode() + eol)
    out += [b"data: " + part.encode() + eol for part in _TEXT_EOL.split(data)]
    out.append(eol)
    return b"".join(out)


class SseParser:
    """Bytes in, complete events out, with bounded buffering.

    A CR ending one chunk and an LF starting the next form ONE line ending. If that CR ended the
    blank line of an event, the event has already been returned with `end == b"\\r"`; the LF is then
    returned as a line-less block whose `end` is b"\\n", so re-emitting `raw` of every block still
    reproduces the input exactly.

    Errors are deferred by one call when complete events precede them in the same chunk, so the
    events before a bad one are delivered the same way whatever the chunking.
    """

    def __init__(self, *, max_event_bytes: int = 1 << 20) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()  # bytes of the current, incomplete line
        self._lines: list[SseLine] = []
        self._size = 0  # bytes of the complete lines of the current event
        self._pending_cr = False
        self._at_start = True
        self._prefix = b""
        self._error: SseError | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._raise_deferred()
        events: list[SseEvent] = []
        try:
            self._feed(chunk, events)
        except SseError as exc:
            if not events:
                raise
            self._error = exc
        return events

    def finish(self) -> list[SseEvent]:
        """End of stream: the rest as an unterminated event, if anything is left."""
        self._raise_deferred()
        events: list[SseEvent] = []
        if self._buf:
            self._at_start = False
            self._line(bytes(self._buf), b"", events)
            self._buf.clear()
        if self._lines or self._prefix:
            events.append(SseEvent(tuple(self._lines), b"", self._prefix))
            self._lines, self._size, self._prefix = [], 0, b""
        return events

    def _raise_deferred(self) -> None:
        if self._error is not None:
            raise self._error

    def _feed(self, chunk: bytes, events: list[SseEvent]) -> None:
        if self._pending_cr and chunk:
            self._pending_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                self._complete_crlf(events)
        buf = self._buf
        buf += chunk
        if self._at_start:
            if len(buf) < len(BOM) and BOM.startswith(buf):
                return
            self._at_start = False
            if buf.startswith(BOM):
                self._prefix = BOM
                del buf[: len(BOM)]
        pos, end = 0, len(buf)
        while (match := _EOL.search(buf, pos)) is not None:
            i = match.start()
            width = 2 if buf[i] == 0x0D and i + 1 < end and buf[i + 1] == 0x0A else 1
            if buf[i] == 0x0D and i + 1 == end:
                self._pending_cr = True
            self._line(bytes(buf[pos:i]), bytes(buf[i : i + width]), events)
            pos = i + width
        del buf[:pos]
        if self._size + len(buf) > self._max:
            raise SseEventTooLarge(f"SSE event larger than {self._max} bytes")

    def _complete_crlf(self, events: list[SseEvent]) -> None:
        if self._lines:
            self._lines[-1] = replace(self._lines[-1], eol=b"\r\n")
            self._size += 1
        else:
            events.append(SseEvent((), b"\n"))

    def _line(self, raw: bytes, eol: bytes, events: list[SseEvent]) -> None:
        if not raw:
            events.append(SseEvent(tuple(self._lines), eol, self._prefix))
            self._lines, self._size, self._prefix = [], 0, b""
            return
        self._size += len(raw) + len(eol)
        if self._size > self._max:
            raise SseEventTooLarge(f"SSE event larger than {self._max} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SseInvalidUtf8("SSE stream is not valid UTF-8") from None
        if text[0] == ":":
            self._lines.append(SseLine(None, text[1:], raw, eol))
            return
        name, _, value = text.partition(":")
        self._lines.append(SseLine(name, value[1:] if value[:1] == " " else value, raw, eol))
