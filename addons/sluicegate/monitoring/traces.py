"""OpenTelemetry traces of the chain: one span per finished flow, exported as OTLP/HTTP JSON.

Only when configured (`monitoring.traces`). Each flow the gateway finished (answered, refused,
failed) becomes one SERVER span named `<METHOD> <route>` with the request id, caller, route,
decision, refusal code, policy rule, status and redaction count as attributes: config names,
codes and numbers, never a value, a path or a token. A `traceparent` the agent sent (W3C trace
context) makes the span its child, so the gateway shows up inside the agent's own trace.

Spans wait in a bounded queue and are POSTed in batches (`batch_size`, or whatever waited
`flush_seconds`) by one worker task, as an `ExportTraceServiceRequest` in OTLP's JSON encoding
(ids as hex, 64-bit integers as strings). A full queue drops the new span, a failed export
(an error or a non-2xx answer, after one retry) drops its batch: both are counted
(`sluicegate_trace_spans_dropped_total`) and the flow never waits for the collector. No
OpenTelemetry SDK is needed; this module imports neither mitmproxy nor the config.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

logger = logging.getLogger("sluicegate.traces")

SPAN_KIND_SERVER: Final = 2
STATUS_UNSET: Final = 0
STATUS_ERROR: Final = 2
SCOPE: Final = "sluicegate"
_TRACEPARENT: Final = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
WARN_EVERY: Final = 60.0

AttributeValue = str | int | float | bool


@dataclasses.dataclass(frozen=True)
class Span:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str | None
    name: str
    start_ns: int
    end_ns: int
    attributes: Mapping[str, AttributeValue]
    error: bool = False

    def to_otlp(self) -> dict[str, Any]:
        span: dict[str, Any] = {
            "traceId": self.trace_id,
            "spanId": self.span_id,
            "name": self.name,
            "kind": SPAN_KIND_SERVER,
            "startTimeUnixNano": str(self.start_ns),
            "endTimeUnixNano": str(self.end_ns),
            "attributes": [_attribute(k, v) for k, v in self.attributes.items()],
            "status": {"code": STATUS_ERROR if self.error else STATUS_UNSET},
        }
        if self.parent_span_id is not None:
            span["parentSpanId"] = self.parent_span_id
        return span


def _attribute(key: str, value: AttributeValue) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    if isinstance(value, float):
        return {"key": key, "value": {"doubleValue": value}}
    return {"key": key, "value": {"stringValue": value}}


def parse_traceparent(value: str | None) -> tuple[str, str] | None:
    """(trace id, parent span id) of a W3C `traceparent` header, or None (absent, malformed,
    or the all-zero ids the spec declares invalid)."""
    if not value:
        return None
    found = _TRACEPARENT.fullmatch(value.strip().lower())
    if found is None or set(found.group(1)) == {"0"} or set(found.group(2)) == {"0"}:
        return None
    return found.group(1), found.group(2)


def flow_span(
    sg: Mapping[str, Any],
    *,
    method: str,
    status: int | None,
    decision: str,
    start: float,
    end: float,
    errored: bool,
    traceparent: str | None = None,
) -> Span:
    """The span of one finished flow, from its recordable facts (`metadata["sluicegate"]`)."""
    parent = parse_traceparent(traceparent)
    trace_id = parent[0] if parent is not None else secrets.token_hex(16)
    route = sg.get("route")
    attributes: dict[str, AttributeValue] = {
        "http.request.method": method,
        "sluicegate.decision": decision,
    }
    if isinstance(sg.get("request_id"), str):
        attributes["sluicegate.request_id"] = sg["request_id"]
    if isinstance(route, str):
        attributes["sluicegate.route"] = route
    if status is not None:
        attributes["http.response.status_code"] = status
    caller = sg.get("caller")
    if isinstance(caller, Mapping) and isinstance(caller.get("subject"), str):
        attributes["sluicegate.caller"] = caller["subject"]
    refusal = sg.get("refusal")
    if isinstance(refusal, Mapping) and isinstance(refusal.get("code"), str):
        attributes["sluicegate.refusal"] = refusal["code"]
    policy = sg.get("policy")
    if isinstance(policy, Mapping):
        for phase in ("request", "response"):
            facts = policy.get(phase)
            if isinstance(facts, Mapping) and isinstance(facts.get("rule"), str):
                attributes[f"sluicegate.policy_rule.{phase}"] = facts["rule"]
    if isinstance(sg.get("base_url"), str):
        attributes["sluicegate.base_url"] = sg["base_url"]
    redacted = _redactions(sg.get("redaction"))
    if redacted:
        attributes["sluicegate.redactions"] = redacted
    return Span(
        trace_id=trace_id,
        span_id=secrets.token_hex(8),
        parent_span_id=parent[1] if parent is not None else None,
        name=f"{method} {route if isinstance(route, str) else 'unrouted'}",
        start_ns=int(start * 1e9),
        end_ns=max(int(end * 1e9), int(start * 1e9)),
        attributes=attributes,
        error=errored or (status is not None and status >= 500),
    )


def _redactions(redaction: Any) -> int:
    total = 0
    if isinstance(redaction, Mapping):
        for counts in redaction.values():
            if isinstance(counts, Mapping):
                total += sum(n for n in counts.values() if isinstance(n, int))
    return total


def export_request(spans: Sequence[Span], service_name: str) -> dict[str, Any]:
    """An OTLP `ExportTraceServiceRequest` in its JSON encoding."""
    resource = {"attributes": [_attribute("service.name", service_name)]}
    return {
        "resourceSpans": [
            {
                "resource": resource,
                "scopeSpans": [
                    {"scope": {"name": SCOPE}, "spans": [span.to_otlp() for span in spans]}
                ],
            }
        ]
    }


def post_otlp(url: str, payload: dict[str, Any], timeout: float) -> int:
    """POST OTLP/JSON without any proxy from the environment (it may point at this gateway)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload, separators=(",", ":")).encode(),
        headers={"content-type": "application/json", "user-agent": "sluicegate-traces"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


class TraceExporter:
    """Spans in a bounded queue, exported in batches by one worker task on the event loop."""

    def __init__(
        self,
        endpoint: str,
        *,
        service_name: str = "sluicegate",
        queue_size: int = 2048,
        batch_size: int = 256,
        timeout: float = 5.0,
        flush_seconds: float = 1.0,
        on_exported: Callable[[int], None] = lambda n: None,
        on_dropped: Callable[[str, int], None] = lambda reason, n: None,
        post: Callable[[str, dict[str, Any], float], int] = post_otlp,
    ) -> None:
        self.endpoint, self.service_name = endpoint, service_name
        self.queue_size, self.batch_size = queue_size, batch_size
        self.timeout, self.flush_seconds = timeout, flush_seconds
        self.on_exported, self.on_dropped, self._post = on_exported, on_dropped, post
        self.queue: collections.deque[Span] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._warned = 0.0

    def add(self, span: Span) -> None:
        """Queue one span (never blocks, never raises); a full queue drops it, counted."""
        if self._closed:
            return
        if len(self.queue) >= self.queue_size:
            self.on_dropped("queue_full", 1)
            return
        self.queue.append(span)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # the worker picks it up once it runs
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._work())
        if len(self.queue) >= self.batch_size and self._wake is not None:
            self._wake.set()

    async def _work(self) -> None:
        assert self._wake is not None
        while not self._closed:
            if len(self.queue) < self.batch_size:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_seconds)
            if not self.queue:
                continue
            batch = [self.queue.popleft() for _ in range(min(self.batch_size, len(self.queue)))]
            await self._export(batch)

    async def _export(self, batch: list[Span]) -> None:
        payload = export_request(batch, self.service_name)
        problem = ""
        for _attempt in range(2):
            try:
                status = await asyncio.to_thread(self._post, self.endpoint, payload, self.timeout)
            except (OSError, ValueError) as e:
                problem = type(e).__name__
                continue
            if 200 <= status < 300:
                self.on_exported(len(batch))
                return
            problem = f"answered {status}"
        self.on_dropped("export_failed", len(batch))
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:  # a collector that is down is not a log flood
            self._warned = now
            logger.warning(
                "sluicegate: trace export failed (%s); %d span(s) dropped", problem, len(batch)
            )

    async def flush(self) -> None:
        """Export everything queued now (tests, shutdown)."""
        while self.queue:
            batch = [self.queue.popleft() for _ in range(min(self.batch_size, len(self.queue)))]
            await self._export(batch)

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
