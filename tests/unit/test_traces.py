"""OTLP/HTTP JSON trace export against a local collector the test starts: spans arrive in
OTLP's JSON encoding, batched; a full queue and a failing collector drop spans and count them;
no value, path or token is in a span."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from sluicegate.monitoring.metrics import GatewayMetrics
from sluicegate.monitoring.traces import (
    Span,
    TraceExporter,
    export_request,
    flow_span,
    parse_traceparent,
)

FACTS: dict[str, Any] = {
    "request_id": "5f0c-req",
    "route": "openai",
    "base_url": "/openai",
    "caller": {"subject": "agent-alice", "groups": ["agents"], "fingerprint": "ab12"},
    "redaction": {"request": {"github-token": 2}, "response": {"aws-key": 1}},
    "policy": {"request": {"rule": "no-files", "action": "block"}},
    "refusal": {"status": 403, "code": "policy_blocked"},
}


class Collector:
    """An OTLP/HTTP receiver on loopback; answers `status` (200 by default)."""

    def __init__(self) -> None:
        self.status = 200
        self.requests: list[dict[str, Any]] = []
        self.content_types: list[str] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                collector.content_types.append(self.headers["content-type"])
                if collector.status == 200:
                    collector.requests.append(json.loads(body))
                self.send_response(collector.status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[dict[str, Any]]:
        return [
            span
            for request in self.requests
            for resource in request["resourceSpans"]
            for scope in resource["scopeSpans"]
            for span in scope["spans"]
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


def span(n: int = 0) -> Span:
    return flow_span(
        {**FACTS, "request_id": f"r{n}"},
        method="POST",
        status=403,
        decision="refused",
        start=1_700_000_000.25,
        end=1_700_000_000.5,
        errored=False,
    )


def attributes(otlp_span: dict[str, Any]) -> dict[str, Any]:
    return {a["key"]: next(iter(a["value"].values())) for a in otlp_span["attributes"]}


def test_a_flow_span_in_otlp_json() -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    s = flow_span(
        FACTS,
        method="POST",
        status=403,
        decision="refused",
        start=1.5,
        end=2.0,
        errored=False,
        traceparent=parent,
    )
    otlp = s.to_otlp()
    assert otlp["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert otlp["parentSpanId"] == "00f067aa0ba902b7"
    assert len(otlp["spanId"]) == 16 and int(otlp["spanId"], 16) >= 0
    assert (otlp["name"], otlp["kind"]) == ("POST openai", 2)
    assert (otlp["startTimeUnixNano"], otlp["endTimeUnixNano"]) == ("1500000000", "2000000000")
    assert attributes(otlp) == {
        "http.request.method": "POST",
        "sluicegate.decision": "refused",
        "sluicegate.request_id": "5f0c-req",
        "sluicegate.route": "openai",
        "http.response.status_code": "403",
        "sluicegate.caller": "agent-alice",
        "sluicegate.refusal": "policy_blocked",
        "sluicegate.policy_rule.request": "no-files",
        "sluicegate.base_url": "/openai",
        "sluicegate.redactions": "3",
    }
    assert otlp["status"] == {"code": 0}
    failed = flow_span({}, method="GET", status=502, decision="error", start=1, end=1, errored=True)
    assert failed.to_otlp()["status"] == {"code": 2} and failed.name == "GET unrouted"
    assert failed.parent_span_id is None and len(failed.trace_id) == 32


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ],
)
def test_malformed_traceparents_start_a_new_trace(value: str | None) -> None:
    assert parse_traceparent(value) is None


def test_export_request_shape() -> None:
    body = export_request([span(1), span(2)], "gw-eu")
    resource = body["resourceSpans"][0]
    assert resource["resource"]["attributes"] == [
        {"key": "service.name", "value": {"stringValue": "gw-eu"}}
    ]
    assert resource["scopeSpans"][0]["scope"] == {"name": "sluicegate"}
    assert len(resource["scopeSpans"][0]["spans"]) == 2


def test_spans_reach_the_collector_in_batches(collector: Collector) -> None:
    metrics = GatewayMetrics()
    exported: list[int] = []

    async def run() -> None:
        exporter = TraceExporter(
            collector.url,
            service_name="test-gw",
            batch_size=4,
            flush_seconds=0.1,
            on_exported=lambda n: (exported.append(n), metrics.trace_spans_exported.inc(n)),
        )
        for n in range(10):
            exporter.add(span(n))
        for _ in range(100):
            if sum(exported) == 10:
                break
            await asyncio.sleep(0.05)
        exporter.close()

    asyncio.run(run())
    assert sum(exported) == 10 and max(exported) <= 4
    got = collector.spans()
    assert sorted(attributes(s)["sluicegate.request_id"] for s in got) == sorted(
        f"r{n}" for n in range(10)
    )
    assert set(collector.content_types) == {"application/json"}
    assert collector.requests[0]["resourceSpans"][0]["resource"]["attributes"][0]["value"] == {
        "stringValue": "test-gw"
    }
    assert metrics.trace_spans_exported.value() == 10
    rendered = metrics.registry.render().decode()
    assert "sluicegate_trace_spans_exported_total 10" in rendered


def test_a_full_queue_and_a_failing_collector_drop_and_count(collector: Collector) -> None:
    metrics = GatewayMetrics()

    def dropped(reason: str, n: int) -> None:
        metrics.trace_spans_dropped.inc(n, reason=reason)

    collector.status = 503

    async def run() -> None:
        exporter = TraceExporter(
            collector.url, queue_size=3, batch_size=3, flush_seconds=10, on_dropped=dropped
        )
        for n in range(5):  # two beyond the queue
            exporter.add(span(n))
        await exporter.flush()  # the collector answers 503 twice: the batch is dropped
        exporter.close()

    asyncio.run(run())
    assert metrics.trace_spans_dropped.value(reason="queue_full") == 2
    assert metrics.trace_spans_dropped.value(reason="export_failed") == 3
    assert collector.requests == []


def test_an_unreachable_collector_never_raises() -> None:
    drops: list[tuple[str, int]] = []

    async def run() -> None:
        exporter = TraceExporter(
            "http://127.0.0.1:9/v1/traces",
            timeout=0.5,
            on_dropped=lambda reason, n: drops.append((reason, n)),
        )
        exporter.add(span())
        await exporter.flush()
        exporter.close()

    asyncio.run(run())
    assert drops == [("export_failed", 1)]


def test_spans_carry_no_value_path_or_token() -> None:
    secret = "ghp_" + "a1B2" * 9
    facts = {**FACTS, "path": f"/v1/{secret}", "token": secret, "caller": {"subject": "bob"}}
    other = flow_span(
        facts, method="GET", status=200, decision="allowed", start=0, end=0, errored=False
    )
    text = json.dumps(span().to_otlp()) + json.dumps(other.to_otlp())
    assert secret not in text and "/v1/" not in text
