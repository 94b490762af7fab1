"""Redaction: buffered request and response bodies, both directions (chain position 5).

Runs after Policy (which judges the original body) and before CredentialInjection, so rules never
see the injected credential and the request leaves with secrets replaced by tags. Request bodies
are always buffered (anything that turned on request streaming is overruled); responses are
buffered unless they are `text/event-stream`, which StreamRedaction (position 6) redacts as they
stream.

A body is decoded first (every content-encoding we know, with the size cap applied to the decoded
bytes, so a compression bomb stops at the cap), redacted by its content type (engine/bodies.py),
and sent on identity-encoded: the receiver parses exactly the bytes that were redacted. Anything
that cannot be decoded or redacted is refused, never passed: 413/415/400 for requests, 502 for
responses. Secrets in the request URL's query string are redacted too (prompts travel there).

Responses are redacted with the flow's scrub literals (every encoding of the injected credential),
so an upstream that echoes the key never hands it to the agent, even with response redaction off.
Counts per rule go to `flow.metadata["sluicegate"]["redaction"]`; matched values go nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Literal, TypeVar

from mitmproxy import http

from sluicegate.auth.caller import Caller
from sluicegate.config import Config
from sluicegate.mitm import flowstate, guard
from sluicegate.mitm.base import GatewayAddon
from sluicegate.redaction.bodies import (
    BodyPolicy,
    BodyRefused,
    BodyResult,
    classify,
    media_type,
    redact_body,
    single_content_type,
)
from sluicegate.redaction.memo import MemoRedactor
from sluicegate.redaction.offload import RedactionTimeout, RedactionUnavailable
from sluicegate.redaction.redactor import LiteralSecret
from sluicegate.redaction.rules import Direction
from sluicegate.redaction.runtime import RedactionRuntime, scope_of
from sluicegate.runtime import for_config
from sluicegate.shapes import decoding

logger = logging.getLogger("sluicegate.redaction")

Part = Literal["request", "response"]

# Bodies (and query strings) larger than this are decoded and redacted on a worker thread, so
# one body does not stall every other flow on the event loop: the rules' worst case is linear,
# a few µs per character on adversarial text, so this much stays well under 50 ms on the loop
# (scripts/bench_loop_lag.py). A thread yields the GIL between rule searches. Bodies larger
# than `redaction.process_bytes` are redacted by a worker process instead (redaction/offload.py):
# outside this interpreter's GIL, and killed when over budget.
THREAD_BYTES = 4 * 1024
# A buffered text/event-stream body runs through the SSE engine, whose cost per byte is higher
# than a plain body's (an event per few bytes of deltas, each channel scanned as it streams):
# scripts/bench_sse_body.py measured 0.1-8.8 µs/byte for the ordinary shapes (text data lines
# the worst) on a loaded 2-core machine, rounded up here. A body whose size predicts more than
# the budget (with the safety factor: a loaded machine, other flows) is refused before any work
# is done. Adversarial deltas (keyword and token prefixes in every delta) measured ~100 µs/byte:
# below this size they still meet the run-time budget (the same 503) rather than this check.
SSE_US_PER_BYTE = 10.0
SSE_SAFETY = 2.0


def sse_max_bytes(budget_seconds: float) -> int:
    """The largest buffered event-stream body the redaction budget is expected to cover."""
    return int(budget_seconds * 1e6 / (SSE_US_PER_BYTE * SSE_SAFETY))


EVENT_STREAM = "text/event-stream"
_FORM = "application/x-www-form-urlencoded"
_QUERY_POLICY = BodyPolicy()  # a query string is always form-encoded text

T = TypeVar("T")


class Redaction(GatewayAddon):
    """Fifth in the chain: nothing leaves in either direction before its body was redacted."""

    def __init__(self) -> None:
        self.runtime: RedactionRuntime | None = None

    def apply(self, config: Config) -> None:
        self.runtime = for_config(config)
        if self.runtime.offload is not None:
            # Start the workers now, not on the first large body (without a running event
            # loop yet: `running`, or the first large body).
            with contextlib.suppress(RuntimeError):
                self.runtime.offload.warm()

    def running(self) -> None:
        if self.runtime is not None and self.runtime.offload is not None:
            self.runtime.offload.warm()

    def done(self) -> None:
        if self.runtime is not None and self.runtime.offload is not None:
            self.runtime.offload.stop()
        super().done()

    # -- request side -----------------------------------------------------------------------------

    @guard.fail_closed("redaction_error")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        runtime = self._runtime()
        if flow.request.stream:
            flow.request.stream = False  # a streamed request body would bypass redaction
        declared = _declared_length(flow.request.headers)
        if declared is not None and declared > runtime.max_body_bytes:
            raise _refusal("request", "body_too_large", runtime.max_body_bytes)

    @guard.fail_closed("redaction_error")
    async def request(self, flow: http.HTTPFlow) -> None:
        runtime = self._runtime()
        request = flow.request
        raw = request.raw_content or b""
        if len(raw) > runtime.max_body_bytes:
            raise _refusal("request", "body_too_large", runtime.max_body_bytes)
        redactor = runtime.request_text_redactor(flowstate.state(flow).caller)
        if redactor is None:
            return
        counts = await self._redact_query(request, redactor, flowstate.state(flow).caller)
        body_counts = await self._redact_message(flow, request, "request", redactor)
        _record(flow, "request", _merged(counts, body_counts))

    # -- response side ----------------------------------------------------------------------------

    @guard.fail_closed("redaction_error")
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        runtime = self._runtime()
        response = flow.response
        if response is None or _is_event_stream(response):
            return  # StreamRedaction's
        if response.stream:
            response.stream = False  # a streamed body would bypass redaction
        declared = _declared_length(response.headers)
        if declared is not None and declared > runtime.max_body_bytes:
            raise _refusal("response", "response_too_large", runtime.max_body_bytes)

    @guard.fail_closed("redaction_error")
    async def response(self, flow: http.HTTPFlow) -> None:
        runtime = self._runtime()
        response = flow.response
        st = flowstate.state(flow)
        if response is None or response.stream or st.streamed_body is not None:
            return  # streamed: redacted (or refused) by StreamRedaction as it went
        raw = response.raw_content or b""
        if len(raw) > runtime.max_body_bytes:
            raise _refusal("response", "response_too_large", runtime.max_body_bytes)
        if runtime.response is None and not st.scrub:
            return  # no rules and no injected credential: nothing to find
        redactor = runtime.response_text_redactor(st.caller, st.scrub)
        counts = await self._redact_message(flow, response, "response", redactor)
        _record(flow, "response", counts)

    # -- shared -----------------------------------------------------------------------------------

    def _runtime(self) -> RedactionRuntime:
        assert self.runtime is not None  # the guard refuses flows while unconfigured
        return self.runtime

    async def _redact_message(
        self, flow: http.HTTPFlow, message: http.Message, part: Part, redactor: MemoRedactor
    ) -> dict[str, int]:
        """Decode, redact and put back `message`'s body (identity-encoded); the counts."""
        runtime = self._runtime()
        raw = message.raw_content or b""
        if not raw:
            return {}  # also keeps HEAD and 304 headers as they are
        limit = runtime.max_body_bytes
        encoding = message.headers.get("content-encoding")
        try:
            body = await _off_loop(
                len(raw), runtime.budget_seconds, decoding.decode_body, raw, encoding, limit
            )
        except decoding.BodyTooLarge:
            raise _refusal(part, _too_large_code(part), limit) from None
        except decoding.DecodingError as e:
            raise _refusal(part, e.code, limit) from None
        flowstate.keep_original(flow, part, body)
        st = flowstate.state(flow)
        scrub = st.scrub if part == "response" else ()
        try:
            content_type = single_content_type(message.headers.get_all("content-type"))
            policy = runtime.body_policy
            if classify(content_type) == "sse":
                if len(body) > sse_max_bytes(runtime.budget_seconds):
                    raise _timeout()
                # The engine stops at the budget too, rather than running on after the refusal.
                policy = dataclasses.replace(policy, sse_budget_seconds=runtime.budget_seconds)
            result = await self._redact_body(
                body, content_type, part, redactor, policy, scrub, st.caller
            )
        except BodyRefused as e:
            if e.code == "redaction_timeout":
                raise _timeout() from None
            raise _refusal(part, e.code, limit, e.message) from None
        if result.changed or "content-encoding" in message.headers:
            if "content-encoding" in message.headers:
                del message.headers["content-encoding"]
            message.content = result.body  # also fixes content-length
        if result.counts:
            logger.info(
                "sluicegate: redacted %s body: %s [request %s]",
                part,
                ", ".join(f"{rule} x{n}" for rule, n in sorted(result.counts.items())),
                flow.id,
            )
        return result.counts

    async def _redact_query(
        self, request: http.Request, redactor: MemoRedactor, caller: Caller | None
    ) -> dict[str, int]:
        """Redact the query string's decoded names and values; the path stays byte for byte."""
        path, sep, query = request.data.path.partition(b"?")
        if not sep or not query:
            return {}
        # A query is form data; forms are never refused.
        result = await self._redact_body(
            query, _FORM, "request", redactor, _QUERY_POLICY, (), caller
        )
        if result.changed:
            request.data.path = path + b"?" + result.body
        return result.counts

    async def _redact_body(
        self,
        body: bytes,
        content_type: str | None,
        part: Part,
        redactor: MemoRedactor,
        policy: BodyPolicy,
        scrub: Iterable[LiteralSecret],
        caller: Caller | None,
    ) -> BodyResult:
        """`redact_body` of `body`: on the loop when small, else a worker process (or thread)."""
        runtime = self._runtime()
        pool = runtime.offload
        if pool is None or len(body) <= runtime.process_bytes:
            return await _off_loop(
                len(body), runtime.budget_seconds, redact_body, body, content_type, redactor, policy
            )
        direction = Direction.REQUEST if part == "request" else Direction.RESPONSE
        literals = [LiteralSecret(s.rule_id, s.value) for s in scrub]
        scope = scope_of(caller)
        try:
            return await pool.redact(body, content_type, direction, policy, literals, scope)
        except RedactionTimeout:
            raise _timeout() from None
        except RedactionUnavailable:
            raise guard.GatewayRefusal(
                503,
                "redaction_unavailable",
                "The gateway's redaction worker failed while redacting this message; nothing "
                "was forwarded.",
            ) from None


def _is_event_stream(response: http.Response) -> bool:
    return media_type(response.headers.get("content-type"))[0] == EVENT_STREAM


def _declared_length(headers: http.Headers) -> int | None:
    """The Content-Length as declared (None: absent or malformed, which mitmproxy refuses)."""
    value = headers.get("content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _too_large_code(part: Part) -> str:
    return "body_too_large" if part == "request" else "response_too_large"


_REQUEST_STATUS = {
    "body_too_large": 413,
    "content_decode_failed": 400,
    "unsupported_content_encoding": 415,
}


def _refusal(part: Part, code: str, limit: int, detail: str | None = None) -> guard.GatewayRefusal:
    """The refusal for `code`: requests 413/400/415, responses always 502 (nothing passes)."""
    status = _REQUEST_STATUS.get(code, 415) if part == "request" else 502
    if code in ("body_too_large", "response_too_large"):
        message = f"The {part} body is larger than the gateway's limit of {limit} bytes"
    elif code == "unsupported_content_encoding":
        message = f"The {part} body's content-encoding is not one of gzip, deflate, br, zstd"
    elif code == "content_decode_failed":
        message = f"The {part} body's content-encoding is corrupt or truncated"
    else:
        message = f"The {part} body cannot be redacted ({detail or code})"
    outcome = "it was not forwarded" if part == "request" else "it was withheld"
    return guard.GatewayRefusal(status, code, f"{message}; {outcome}.")


def _merged(*parts: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in parts:
        for rule, n in counts.items():
            total[rule] = total.get(rule, 0) + n
    return total


def _record(flow: http.HTTPFlow, part: Part, counts: dict[str, int]) -> None:
    flowstate.count_redactions(flow, part, counts)


async def _off_loop(size: int, budget: float, fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)`, on a worker thread with a time budget when `size` is large."""
    if size <= THREAD_BYTES:
        return fn(*args)
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn, *args), budget)
    except TimeoutError:
        raise _timeout() from None


def _timeout() -> guard.GatewayRefusal:
    return guard.GatewayRefusal(
        503,
        "redaction_timeout",
        "The gateway could not redact this message within its time budget; nothing was forwarded.",
    )
