"""StreamRedaction: redact `text/event-stream` responses as they stream (chain position 6).

mitmproxy buffers a response unless `flow.response.stream` is set, so without this addon an SSE
answer would reach the agent only when complete. Here each upstream chunk is content-decoded
(`shapes/decoding.py`, bounded per chunk), redacted event by event (`redaction/sse.py` over the
content model of `shapes/events.py`: text that cannot be part of a secret goes out at once, a
possible secret's prefix is held back up to `redaction.max_hold_chars` per channel), checked by the
flow's response policy, and sent on. Text
that has left cannot be taken back, so anything that goes wrong mid-stream (a decode error, an
oversized event, an engine error, a policy rule matching) ends the stream with one final SSE error
event, after which nothing more of the upstream body is sent. The stream function never raises
into mitmproxy: it runs inside mitmproxy's protocol layer, outside every guard, where an exception
is logged with its text ("mitmproxy has crashed!") and leaves the connection half-handled.

With `redaction.responses: false` the flow's scrub literals (the injected credential in all its
encodings, the caller's token) are still masked.

mitmproxy keeps no body for a streamed response, so the bytes the client received are kept in
`flowstate.state(flow).streamed_body` (up to `gateway.max_body_bytes`, whole events only) and put
into `flow.response` in the `response` hook, for the recorder. Request bodies are never streamed
past the buffered redaction: a `flow.request.stream` set by anything is switched off.
"""

from __future__ import annotations

import logging
import sys
import traceback
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final

from mitmproxy import http

from sluicegate.config import Config
from sluicegate.mitm import flowstate, guard
from sluicegate.mitm.base import GatewayAddon
from sluicegate.policy.decisions import Decision
from sluicegate.policy.stream import ResponseScanner, sse_error_event
from sluicegate.redaction.bodies import event_stream_charset, media_type
from sluicegate.redaction.json_redact import JsonStrings
from sluicegate.redaction.redactor import StreamTooSlow
from sluicegate.redaction.runtime import RedactionRuntime
from sluicegate.redaction.sse import SseRedactor, error_event
from sluicegate.runtime import for_config
from sluicegate.shapes.decoding import DecodingError, IncrementalDecoder, UnsupportedEncoding
from sluicegate.shapes.sse import SseError

logger = logging.getLogger("sluicegate.streaming")

SSE_CONTENT_TYPE: Final = "text/event-stream"
FAULT_POINT: Final = "StreamRedaction.stream"
# One SSE event may be this large (the engine's default: `response.completed` repeats the whole
# output); never more than the gateway inspects in a buffered body.
MAX_EVENT_BYTES: Final = 8 << 20
STREAM_ERROR_CODE: Final = "stream_redaction_error"
STREAM_ERROR_MESSAGE: Final = (
    "The gateway stopped this stream because the rest of it could not be redacted safely."
)


def is_event_stream(headers: http.Headers) -> bool:
    media_type = headers.get("content-type", "").split(";", 1)[0]
    return media_type.strip().lower() == SSE_CONTENT_TYPE


class _Pipeline:
    """decode -> redact: raw upstream chunks in, whole redacted SSE events out."""

    def __init__(self, decoder: IncrementalDecoder, redactor: SseRedactor) -> None:
        self.decoder = decoder
        self.redactor = redactor

    def feed(self, chunk: bytes) -> bytes:
        return self.redactor.feed(self.decoder.decode(chunk))

    def finish(self) -> bytes:
        return self.redactor.feed(self.decoder.finish()) + self.redactor.finish()


class StreamSession:
    """The `flow.response.stream` function of one SSE response. Never raises.

    Every piece of output is whole SSE events, checked by the policy scanners before it is
    released; a failure or a policy decision replaces it with one final error event and the
    session releases nothing more (the rest of the upstream body is read and dropped).
    """

    def __init__(
        self,
        pipeline: _Pipeline,
        *,
        flow: http.HTTPFlow,
        scanners: Sequence[ResponseScanner] = (),
        body: bytearray | None = None,
        body_limit: int = 0,
        transform: Callable[[bytes, bool], bytes] | None = None,
    ) -> None:
        self._pipeline: _Pipeline | None = pipeline
        self._transform = transform  # applied to redacted events before the policy sees them
        self._flow = weakref.ref(flow)
        self.request_id = flowstate.state(flow).request_id
        self._scanners = tuple(scanners)
        self._body = body
        self._body_limit = body_limit
        self._pending = b""
        self._counts: dict[str, int] = {}
        self.sent = 0  # bytes released to the client
        self.cut: str | None = None  # why the stream was cut (a stable code)
        self.truncated = False  # the kept body stops before the end of what was sent
        for scanner in self._scanners:  # a rule without body conditions acts before any byte
            decision = scanner.feed("")
            if decision is not None:
                self._pending = self._policy_cut(decision)
                break

    @property
    def counts(self) -> dict[str, int]:
        """Redactions per rule id so far (kept after `release`)."""
        if self._pipeline is not None:
            self._counts = self._pipeline.redactor.counts
        return dict(self._counts)

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        end = chunk == b""
        out, self._pending = self._pending, b""
        pipeline = self._pipeline
        if pipeline is not None:
            try:
                injector = guard.fault_injector
                flow = self._flow()
                if injector is not None and flow is not None:
                    injector(FAULT_POINT, flow)
                piece = pipeline.finish() if end else pipeline.feed(chunk)
                if self._transform is not None:
                    piece = self._transform(piece, end)
                out += self._checked(piece)
            except Exception as exc:
                out += self._failed(exc)
            if end:
                self.release()
        self._keep(out)
        # Mid-stream, an empty chunk would end an HTTP/1.1 chunked body: send nothing instead.
        return out if out or end else []

    def release(self) -> None:
        """Drop the decoder, redactor and scanners (end of stream, cut, client gone)."""
        if self._pipeline is not None:
            self._counts = self._pipeline.redactor.counts
        self._pipeline = None
        self._scanners = ()

    def _checked(self, out: bytes) -> bytes:
        pipeline = self._pipeline
        generated = pipeline.redactor.take_text() if pipeline is not None else ""
        if not out or not self._scanners:
            return out
        # The raw events, and the text their channels carry (every delta field: content,
        # reasoning, refusal, tool arguments), as the buffered policy sees an SSE body.
        views = (out.decode("utf-8", "replace"), generated)
        for scanner, view in zip(self._scanners, views, strict=False):
            decision = scanner.feed(view)
            if decision is not None:
                return self._policy_cut(decision)
        return out

    def _policy_cut(self, decision: Decision) -> bytes:
        logger.info(
            "sluicegate: policy %s cut the stream by %s [request %s]",
            decision.action,
            decision.rule_id,
            self.request_id,
        )
        self.cut = "policy_blocked"
        self.release()
        return sse_error_event(decision, self.request_id)

    def _failed(self, exc: Exception) -> bytes:
        known = isinstance(exc, DecodingError | SseError | StreamTooSlow)
        code = getattr(exc, "code", STREAM_ERROR_CODE) if known else STREAM_ERROR_CODE
        # Never the exception text: it may carry response data.
        where = "; ".join(
            f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"
            for frame in traceback.extract_tb(exc.__traceback__)[-3:]
        )
        logger.log(
            logging.WARNING if known else logging.ERROR,
            "sluicegate: %s: stream cut after %d bytes: %s at %s [request %s]",
            code,
            self.sent,
            type(exc).__name__,
            where,
            self.request_id,
        )
        self.cut = code
        self.release()
        return error_event(code, STREAM_ERROR_MESSAGE, request_id=self.request_id)

    def _keep(self, out: bytes) -> None:
        """Count what goes out and keep it for the recorder, whole pieces only, up to the cap."""
        self.sent += len(out)
        if self._body is None or not out or self.truncated:
            return
        if len(self._body) + len(out) > self._body_limit:
            self.truncated = True
            return
        self._body += out


class StreamRedaction(GatewayAddon):
    """Sixth in the chain: after the buffered Redaction, before CredentialInjection."""

    def __init__(self) -> None:
        self.runtime: RedactionRuntime | None = None

    def apply(self, config: Config) -> None:
        self.runtime = for_config(config)

    @guard.fail_closed(STREAM_ERROR_CODE)
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.stream:
            # A streamed upload would leave before the buffered redaction could see it.
            flow.request.stream = False
            logger.info("sluicegate: request streaming switched off [request %s]", flow.id)

    @guard.fail_closed(STREAM_ERROR_CODE)
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        runtime = self.runtime
        if response is None or not is_event_stream(response.headers):
            return
        assert runtime is not None
        max_event = min(MAX_EVENT_BYTES, runtime.max_body_bytes)
        try:
            decoder = IncrementalDecoder(
                response.headers.get("content-encoding"), sys.maxsize, max_chunk_output=max_event
            )
        except UnsupportedEncoding:
            raise guard.GatewayRefusal(
                502,
                "unsupported_content_encoding",
                "The upstream's stream uses a content encoding the gateway cannot decode, so it "
                "cannot be redacted; nothing was forwarded.",
            ) from None
        charset = media_type(response.headers.get("content-type"))[1].get("charset")
        if event_stream_charset(charset) is None:
            raise guard.GatewayRefusal(
                502,
                "charset_mismatch",
                "The upstream's stream declares a charset the gateway cannot read as UTF-8, so "
                "it cannot be redacted; nothing was forwarded.",
            )
        st = flowstate.state(flow)
        redactor = runtime.for_response(st.scrub)
        max_hold = runtime.max_hold
        sse = SseRedactor(
            lambda: redactor.stream(max_hold),
            max_event_bytes=max_event,
            strings=JsonStrings(runtime.response_text_redactor(st.caller, st.scrub)),
        )
        response_policy = st.response_policy
        # Two scanners: the released events as sent, and the text their channels carry.
        scanners = [response_policy.stream(), response_policy.stream()] if response_policy else []
        st.streamed_body = bytearray()
        session = StreamSession(
            _Pipeline(decoder, sse),
            flow=flow,
            scanners=scanners,
            body=st.streamed_body,
            body_limit=runtime.max_body_bytes,
            transform=st.mcp.stream_filter if st.mcp is not None else None,
        )
        # The bytes change: the length is unknown and they leave decoded.
        for name in ("content-length", "content-encoding"):
            if name in response.headers:
                del response.headers[name]
        chunked = "chunked" in response.headers.get("transfer-encoding", "").lower()
        if flow.request.http_version == "HTTP/1.1" and not chunked:
            response.headers["transfer-encoding"] = "chunked"  # keep-alive without a length
        response.stream = session

    @guard.fail_closed(STREAM_ERROR_CODE, skip_refused=False)
    def response(self, flow: http.HTTPFlow) -> None:
        session = _session(flow)
        if session is None:
            return
        _settle(flow, session)
        assert flow.response is not None
        # What the client received, for the recorder (mitmproxy kept no body).
        flow.response.raw_content = bytes(flowstate.state(flow).streamed_body or b"")

    @guard.fail_closed(STREAM_ERROR_CODE, skip_refused=False)
    def error(self, flow: http.HTTPFlow) -> None:
        session = _session(flow)
        if session is not None:  # client or upstream gone mid-stream
            _settle(flow, session)


def _session(flow: http.HTTPFlow) -> StreamSession | None:
    stream: Any = flow.response.stream if flow.response is not None else None
    return stream if isinstance(stream, StreamSession) else None


def _settle(flow: http.HTTPFlow, session: StreamSession) -> None:
    """Release the engine state and record what the stream did."""
    session.release()
    flowstate.count_redactions(flow, "response", session.counts)
    facts: dict[str, Any] = {"bytes_sent": session.sent}
    if session.cut is not None:
        facts["cut"] = session.cut
    if session.truncated:
        facts["body_truncated"] = True
    flowstate.record(flow, "stream", facts)
