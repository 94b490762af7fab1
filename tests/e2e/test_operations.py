"""Running it as a service: health, readiness and Prometheus metrics scraped over HTTP, structured
JSON logs parsed line by line, audit lines received by a webhook (with retries), and none of them
holding a secret."""

from __future__ import annotations

import http.server
import json
import re
import secrets
import string
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import Gateway, recording_section
from tests.support.upstream import FakeUpstream


class Collector:
    """A SIEM's HTTP input on loopback: fails the first `failures` POSTs, then takes them."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[dict] = []
        self.attempts = 0
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                collector.attempts += 1
                if collector.failures > 0:
                    collector.failures -= 1
                    self.send_response(500)
                else:
                    collector.received.append(json.loads(body))
                    self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/audit"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector(failures=2)
    yield c
    c.close()


def github_token() -> str:
    alnum = string.ascii_letters + string.digits
    return "ghp_" + "".join(secrets.choice(alnum) for _ in range(36))


def wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def monitoring_port(gw: Gateway) -> int:
    found = re.search(r"monitoring listening at http://127\.0\.0\.1:(\d+)", gw.settled_logs())
    assert found, gw.logs
    return int(found.group(1))


def sample(metrics: str, name: str, **labels: str) -> float:
    for line in metrics.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_readiness_metrics_json_logs_and_audit_push(
    start_gateway, upstream: FakeUpstream, token: str, tmp_path: Path, collector: Collector
) -> None:
    recordings = tmp_path / "recordings"
    json_log = tmp_path / "logs" / "sluicegate.jsonl"

    def edit(cfg: dict) -> None:
        cfg["recording"] = recording_section(recordings)
        cfg["monitoring"] = {
            "listen_port": 0,
            "json_log": str(json_log),
            "audit_webhook": {"url": {"env": "AUDIT_HOOK"}, "retries": 4},
        }

    gw = start_gateway(edit, env={"AUDIT_HOOK": collector.url})
    base = f"http://127.0.0.1:{monitoring_port(gw)}"
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"config": "ok", "recording": "ok", "state": "ok"}

    secret = github_token()
    with gw.client(token) as client:
        chat = client.post(
            upstream.url("/v1/chat/completions"),
            json={"messages": [{"role": "user", "content": f"token {secret}"}]},
        )
        streamed = client.post(
            upstream.url("/v1/chat/completions"), json={"messages": [], "stream": True}
        )
        denied = client.get(upstream.url("/v1/a;b"))  # refused before it leaves
    assert (chat.status_code, streamed.status_code, denied.status_code) == (200, 200, 400)

    # -- /metrics, as Prometheus scrapes it
    scraped = httpx.get(f"{base}/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
    metrics = scraped.text
    assert (
        sample(
            metrics, "sluicegate_requests_total", route="openai", decision="allowed", status="200"
        )
        == 2
    )
    assert sample(metrics, "sluicegate_requests_total", decision="refused", status="400") == 1
    assert sample(metrics, "sluicegate_refusals_total", code="invalid_path", status="400") == 1
    assert (
        sample(metrics, "sluicegate_redactions_total", rule="github-token", direction="request")
        == 1
    )
    assert sample(metrics, "sluicegate_request_duration_seconds_count", route="openai") == 2
    assert 'sluicegate_request_duration_seconds_bucket{route="openai",le="+Inf"} 2' in metrics
    assert "# TYPE sluicegate_holds_waiting gauge" in metrics
    assert "sluicegate_state_available 1" in metrics
    for value in (secret, token, UPSTREAM_KEY, "agent-"):
        assert value not in metrics

    # -- JSON logs: one object per line, every flow with its request id, caller, route, decision
    wait_for(lambda: json_log.exists() and json_log.read_text().count('"event":"flow"') >= 3)
    lines = [json.loads(line) for line in json_log.read_text().splitlines()]
    flows = {line["request_id"]: line for line in lines if line["event"] == "flow"}
    chat_line = flows[chat.headers["x-sluicegate-request-id"]]
    assert chat_line["route"] == "openai" and chat_line["decision"] == "allowed"
    assert chat_line["caller"] and chat_line["rules"] == {"github-token": 1}
    assert chat_line["status"] == 200 and chat_line["duration_ms"] > 0
    assert flows[denied.headers["x-sluicegate-request-id"]]["refusal"] == "invalid_path"
    assert any(line["event"] == "log" and line["logger"].startswith("sluicegate") for line in lines)
    text = json_log.read_text()
    for value in (secret, token, UPSTREAM_KEY):
        assert value not in text

    # -- the audit push: every line arrives, in order, after the collector's two failures
    audit = recordings / "audit.jsonl"
    wait_for(lambda: len(collector.received) >= len(audit.read_text().splitlines()))
    written = [json.loads(line) for line in audit.read_text().splitlines()]
    assert collector.received == written
    assert collector.attempts == len(written) + 2
    assert {"policy_rule", "approver", "approval_reason", "rules"} <= collector.received[0].keys()
    assert "retry 1 of 4" in gw.logs and collector.url not in gw.logs

    # -- readiness follows the recording
    recordings.rename(tmp_path / "moved")
    gone = httpx.get(f"{base}/readyz")
    assert gone.status_code == 503
    assert gone.json()["checks"]["recording"] == "recording_dir_missing"
    (tmp_path / "moved").rename(recordings)
    assert httpx.get(f"{base}/readyz").status_code == 200


def test_the_control_listener_serves_them_too(start_gateway, tmp_path: Path) -> None:
    token_file = tmp_path / "admin"
    token_file.write_text(secrets.token_urlsafe(32))

    def edit(cfg: dict) -> None:
        cfg["approvals"] = {"admin_token": {"file": str(token_file)}, "listen_port": 0}

    gw = start_gateway(edit)
    found = re.search(r"approvals API listening at http://127\.0\.0\.1:(\d+)", gw.settled_logs())
    assert found, gw.logs
    base = f"http://127.0.0.1:{found.group(1)}"
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert httpx.get(f"{base}/readyz").json()["checks"]["recording"] == "disabled"
    assert "sluicegate_requests_total" in httpx.get(f"{base}/metrics").text
