"""Metrics exposition, the audit push's retries and queue (monitoring/)."""

from __future__ import annotations

import asyncio
import json

from sluicegate.monitoring import metrics as m
from sluicegate.monitoring.push import AuditPush


def test_counters_histograms_and_label_escaping_render_as_prometheus_text() -> None:
    gm = m.GatewayMetrics()
    gm.observe_flow(
        {
            "route": 'we"ird\\route',
            "redaction": {"request": {"github-token": 2}, "response": {}},
            "refusal": {"code": "recording_unavailable", "status": 503},
            "stream": {"cut": "policy_blocked"},
            "timings": {"total_ms": 120.0},
        },
        503,
        "refused",
    )
    text = gm.registry.render().decode()
    assert (
        'sluicegate_requests_total{route="we\\"ird\\\\route",decision="refused",status="503"} 1'
        in text
    )
    assert 'sluicegate_redactions_total{rule="github-token",direction="request"} 2' in text
    assert 'sluicegate_recording_failures_total{code="recording_unavailable"} 1' in text
    assert 'sluicegate_stream_cuts_total{code="policy_blocked"} 1' in text
    assert 'le="0.1"} 0' in text and 'le="0.25"} 1' in text and 'le="+Inf"} 1' in text
    assert "# TYPE sluicegate_request_duration_seconds histogram" in text


def test_series_are_bounded() -> None:
    counter = m.Counter("c", "help", ("rule",))
    for i in range(m.MAX_SERIES + 5):
        counter.inc(rule=str(i))
    assert len(counter.values) == m.MAX_SERIES + 1
    assert counter.value(rule="other") == 5


def test_the_push_retries_then_delivers_in_order_and_drops_when_full() -> None:
    attempts: list[int] = []
    delivered: list[dict] = []
    dropped: list[int] = []

    def post(url: str, entry: dict, timeout: float) -> int:
        attempts.append(entry["seq"])
        if len(attempts) <= 2:
            return 500
        delivered.append(entry)
        return 204

    async def run() -> None:
        push = AuditPush(
            _Ref(),  # type: ignore[arg-type]
            timeout=1,
            retries=3,
            queue_size=2,
            post=post,
            first_backoff=0.01,
            on_dropped=dropped.append,
        )
        for seq in range(3):  # the third pushes the first out of the queue of two
            push.line_written(json.dumps({"seq": seq}).encode())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(delivered) == 2:
                break
        push.close()

    asyncio.run(run())
    # The queue of two held lines 1 and 2 (line 0 was pushed out); line 1 took three attempts.
    assert [e["seq"] for e in delivered] == [1, 2]
    assert attempts == [1, 1, 1, 2]
    assert sum(dropped) == 1


class _Ref:
    def read(self) -> str:
        return "https://siem.example/in"
