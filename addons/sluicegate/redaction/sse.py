"""Bytes-in, bytes-out redaction of a Server-Sent Events response.

Feed it the (already content-decoded) response body chunk by chunk; each call returns the bytes
that are safe to send now. Output is made of whole events, so the stream can be cut after any call
with `error_event`. The output is the same for any chunking of the same input.

Memory is bounded: one event (`max_event_bytes`; 8 MiB by default because `response.completed`
repeats the whole output), plus per open text channel what its TextStream holds (bounded by the
redactor's `max_hold`), with at most `max_channels` channels open.
"""

from __future__ import annotations

import json

from sluicegate.shapes.channels import StringPolicy, TextStream, TextStreamFactory
from sluicegate.shapes.events import EventRewriter, WholeTextMemo
from sluicegate.shapes.sse import SseError, SseEvent, SseParser, format_event

__all__ = [
    "SseError",
    "SseRedactor",
    "TextStream",
    "TextStreamFactory",
    "WholeTextMemo",
    "error_event",
]


class SseRedactor:
    """One response stream: SSE parser + per-channel text redaction + event rewriting.

    `make_text_stream` is called once per text channel (and per standalone string), e.g.
    `lambda: redactor.stream(max_hold)`. `strings` treats key-addressed values and whole strings
    (the gateway passes `json_redact.JsonStrings`, so they get what a buffered JSON body gets:
    the rule pack's key rules, the same tags); without it there are no key rules and `memo` (shared
    by streams whose `make_text_stream` redacts the same way) remembers short strings.
    Where the text lives in each event is the content model's business (shapes/events.py).
    """

    def __init__(
        self,
        make_text_stream: TextStreamFactory,
        *,
        max_event_bytes: int = 8 << 20,
        max_channels: int = 1024,
        strings: StringPolicy | None = None,
        memo: WholeTextMemo | None = None,
    ) -> None:
        self._parser = SseParser(max_event_bytes=max_event_bytes)
        self._rewriter = EventRewriter(
            make_text_stream, max_channels=max_channels, strings=strings, memo=memo
        )
        self._last: SseEvent | None = None
        self._error: SseError | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Matches per rule id so far (from TextStreams that expose `.counts`)."""
        return self._rewriter.counts

    def take_text(self) -> str:
        """The generated text (every text channel) released since the last call: what the
        response policy reads of a stream, without parsing the events again."""
        return self._rewriter.take_released()

    def feed(self, chunk: bytes) -> bytes:
        """Raises `SseError` (typed, with a stable `code`) when the stream must be cut.

        When complete events precede the failure in the same call, they are returned first and
        the error is raised by the next call, so what reaches the client does not depend on
        how the network chunked the input.
        """
        if self._error is not None:
            raise self._error
        out: list[bytes] = []
        try:
            for event in self._parser.feed(chunk):
                out.append(self._rewriter.rewrite(event))
                self._last = event
        except SseError as exc:
            if not out:
                raise
            self._error = exc
        return b"".join(out)

    def finish(self) -> bytes:
        """End of stream: the last (possibly unterminated) event and all held text."""
        if self._error is not None:
            raise self._error
        out = []
        for event in self._parser.finish():
            out.append(self._rewriter.rewrite(event))
            self._last = event
        tail = self._rewriter.finish()
        if tail and self._last is not None and not self._last.terminated:
            out.append(self._termination(self._last))
        return b"".join(out) + tail

    @staticmethod
    def _termination(event: SseEvent) -> bytes:
        """Bytes that end an unterminated final event so synthesized events can follow it."""
        last_line_open = bool(event.lines) and not event.lines[-1].eol
        return event.eol * (2 if last_line_open else 1)


def error_event(code: str, message: str, *, request_id: str | None = None) -> bytes:
    """A final SSE error event for a stream that must be cut.

    Shaped so both SDKs raise: the OpenAI SDK raises on any event whose JSON has an `error`
    object (using its `message`), the Anthropic SDK on `event: error`.
    """
    error: dict[str, str] = {"type": "sluicegate_error", "code": code, "message": message}
    if request_id is not None:
        error["request_id"] = request_id
    payload = {"type": "error", "error": error}
    return format_event(json.dumps(payload, separators=(",", ":")), event="error")
