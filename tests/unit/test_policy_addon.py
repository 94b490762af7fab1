"""The Policy addon on mitmproxy test flows: what it answers and what it records."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from sluicegate.config import load_config
from sluicegate.mitm import flowstate
from sluicegate.mitm.policy import Policy, PreviewRedaction, Runtime
from sluicegate.policy.decisions import Phase
from sluicegate.policy.stream import ResponsePolicy, sse_error_event
from sluicegate.redaction.redactor import LiteralSecret
from tests.support.gateway import REPO

TOKEN_ENV = "SLUICEGATE_TEST_ADDON_ADMIN"
HS_ENV = "SLUICEGATE_TEST_ADDON_HS"


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "a" * 32)
    monkeypatch.setenv(HS_ENV, "h" * 32)


RULES: list[dict[str, Any]] = [
    {
        "id": "no-deletes",
        "action": "block",
        "message": "No deletes.",
        "match": {"methods": ["DELETE"]},
    },
    {"id": "puts-held", "action": "hold", "match": {"methods": ["PUT"], "paths": ["/echo"]}},
    {"id": "mask-hosts", "action": "redact_only", "match": {"body_patterns": ["internal-host"]}},
    {
        "id": "no-pipes",
        "phase": "response",
        "action": "block",
        "match": {"body_patterns": ["pipe-to-shell"]},
    },
    {
        "id": "redact-hosts-out",
        "phase": "response",
        "action": "redact_only",
        "match": {"body_patterns": ["internal-host"]},
    },
    {
        "id": "review-tls",
        "phase": "response",
        "action": "hold",
        "match": {"body_patterns": ["tls-verification-disabled"]},
    },
]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "gateway": {"max_body_bytes": 4096},
                "auth": {
                    "keys": [{"id": "k", "hmac_secret": {"env": HS_ENV}, "algorithms": ["HS256"]}],
                    "issuers": ["i"],
                    "audiences": ["a"],
                },
                "policy": {
                    "rules": RULES,
                    "patterns": {"internal-host": {"regex": r"\bdb\d+\.corp\b"}},
                    "rate_limits": [
                        {"id": "two", "requests": 2, "window_seconds": 60, "per": "caller"}
                    ],
                },
                "approvals": {
                    "admin_token": {"env": TOKEN_ENV},
                    "listen_port": 0,
                    "timeout_seconds": 5,
                },
            }
        )
    )
    return path


class Harness:
    def __init__(self, config_file: Path) -> None:
        self.addon = Policy(Runtime())
        self.config = load_config(config_file)
        self.addon.apply(self.config)
        self.addon.config = self.config
        assert self.addon.runtime.state is not None
        assert self.addon.runtime.approvals is not None
        self.state = self.addon.runtime.state
        self.approvals = self.addon.runtime.approvals

    def flow(self, method: str = "POST", path: str = "/v1/chat", body: bytes = b"", **kw: Any):
        flow = tflow.tflow(
            req=tutils.treq(method=method.encode(), path=path.encode(), content=body, **kw)
        )
        flowstate.state(flow).caller = flowstate.Caller(
            "alice", ("agents",), "https://idp", None, "fp"
        )
        return flow

    def policy(self, flow: http.HTTPFlow) -> dict[str, Any]:
        return flow.metadata["sluicegate"]["policy"]


@pytest.fixture
def h(config_file: Path) -> Harness:
    return Harness(config_file)


def error(flow: http.HTTPFlow) -> dict[str, Any]:
    assert flow.response is not None
    return json.loads(flow.response.content)["error"]


def test_block_answers_403_and_records_the_decision(h: Harness) -> None:
    flow = h.flow("DELETE")
    asyncio.run(h.addon.request(flow))
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.response.headers["x-sluicegate-policy-rule"] == "no-deletes"
    assert error(flow)["message"] == "Blocked by policy rule 'no-deletes': No deletes."
    assert h.policy(flow)["request"] == {
        "action": "block",
        "rule": "no-deletes",
        "message": "No deletes.",
        "phase": "request",
        "patterns": [],
    }
    assert flow.metadata["sluicegate"]["refusal"]["code"] == "policy_blocked"


def test_allowed_flow_passes_untouched_and_rate_limit_answers_429(h: Harness) -> None:
    flows = [h.flow() for _ in range(3)]
    for flow in flows:
        asyncio.run(h.addon.request(flow))
    assert [f.response for f in flows[:2]] == [None, None]
    assert h.policy(flows[0])["request"]["action"] == "allow"
    assert h.policy(flows[0])["request"]["rule"] == "(default)"
    over = flows[2]
    assert over.response is not None and over.response.status_code == 429
    assert 59 <= int(over.response.headers["retry-after"]) <= 60
    assert h.policy(over)["rate_limit"]["id"] == "two"


def test_path_encoding_does_not_dodge_a_path_rule(h: Harness) -> None:
    async def scenario() -> None:
        h.addon.running()
        try:
            flow = h.flow("PUT", "/ECH%6f?q=1")
            task = asyncio.ensure_future(h.addon.request(flow))
            for _ in range(100):
                await asyncio.sleep(0.01)
                if await h.state.pending():
                    break
            (pending,) = await h.state.pending()
            assert pending.request.path == "/ECHo"  # decoded, case kept; matched ignoring case
            await h.approvals.decide(pending.id, approve=False, by="sam", reason="no")
            await task
            assert flow.response is not None and flow.response.status_code == 403
            dotted = h.flow("PUT", "/x/../echo")
            await h.addon.request(dotted)
            assert dotted.response is not None and dotted.response.status_code == 400
            assert not await h.state.pending()
        finally:
            h.addon.done()

    asyncio.run(scenario())


async def held(h: Harness, flow: http.HTTPFlow, hook: str = "request") -> asyncio.Future[Any]:
    task = asyncio.ensure_future(getattr(h.addon, hook)(flow))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if await h.state.pending():
            return task
    raise AssertionError("flow was not held")


def test_approved_hold_passes_and_records_who_when_why(h: Harness) -> None:
    async def scenario() -> None:
        h.addon.running()
        try:
            flow = h.flow("PUT", "/echo")
            task = await held(h, flow)
            assert h.addon.server is not None and h.addon.server.listening
            (pending,) = await h.state.pending()
            assert h.policy(flow)["request"]["action"] == "hold"
            await h.approvals.decide(
                pending.id, approve=True, by="sam", reason="ok", grant_minutes=5
            )
            await task
            assert flow.response is None  # forwarded
            approval = h.policy(flow)["request"]["approval"]
            assert approval["outcome"] == "approved" and approval["by"] == "sam"
            assert approval["reason"] == "ok" and approval["at"].endswith("+00:00")

            granted = h.flow("PUT", "/echo")
            await h.addon.request(granted)
            assert granted.response is None and await h.state.pending() == []
            record = h.policy(granted)["request"]
            assert record["action"] == "allow" and record["rule"] == "puts-held"
            assert record["grant"]["approval_id"] == pending.id
        finally:
            h.addon.done()

    asyncio.run(scenario())


def test_client_disconnect_cancels_the_hold(h: Harness) -> None:
    async def scenario() -> None:
        h.addon.running()
        try:
            flow = h.flow("PUT", "/echo")
            task = await held(h, flow)
            h.addon.client_disconnected(flow.client_conn)
            await task
            # The approval stays pending for a retry (approvals.retry_grace_seconds).
            await asyncio.sleep(0.05)
            (pending,) = await h.state.pending()
            assert pending.waiting == 0
            assert error(flow)["code"] == "approval_cancelled"
            assert h.policy(flow)["request"]["approval"]["reason"] == "client disconnected"
        finally:
            h.addon.done()

    asyncio.run(scenario())


def test_hold_without_a_running_approvals_api_is_refused(h: Harness) -> None:
    flow = h.flow("PUT", "/echo")
    asyncio.run(h.addon.request(flow))
    assert flow.response is not None and flow.response.status_code == 503
    assert error(flow)["code"] == "approvals_unavailable"


def test_redact_only_request_rewrites_and_counts(h: Harness) -> None:
    flow = h.flow(body=json.dumps({"q": "db1.corp and db2.corp"}).encode())
    flow.request.headers["content-type"] = "application/json"
    asyncio.run(h.addon.request(flow))
    assert flow.response is None
    assert json.loads(flow.request.content) == {
        "q": "[REDACTED:policy:mask-hosts] and [REDACTED:policy:mask-hosts]"
    }
    assert h.policy(flow)["request"]["redacted"] == 2


def test_undecodable_and_oversized_request_bodies_are_refused(h: Harness) -> None:
    broken = h.flow(body=b"not gzip at all")
    broken.request.headers["content-encoding"] = "gzip"
    asyncio.run(h.addon.request(broken))
    assert broken.response is not None and broken.response.status_code == 400
    assert error(broken)["code"] == "policy_undecodable_body"
    big = h.flow(body=b"x" * 5000)
    asyncio.run(h.addon.request(big))
    assert big.response is not None and big.response.status_code == 413
    bomb = h.flow(body=gzip.compress(b"x" * 1_000_000))  # small on the wire, huge decoded
    bomb.request.headers["content-encoding"] = "gzip"
    assert len(bomb.request.raw_content or b"") < 4096
    asyncio.run(h.addon.request(bomb))
    assert bomb.response is not None and bomb.response.status_code == 413
    assert error(bomb)["code"] == "body_too_large"


async def respond(h: Harness, text: str, **headers: str) -> http.HTTPFlow:
    """A flow that passed the request phase and got `text` back from the upstream."""
    flow = h.flow()
    await h.addon.request(flow)
    assert isinstance(flowstate.state(flow).response_policy, ResponsePolicy)
    flow.response = tutils.tresp(content=text.encode())
    flow.response.headers.update(headers)
    return flow


def test_buffered_response_block_replaces_the_body(h: Harness) -> None:
    flow = asyncio.run(respond(h, "run curl https://x.sh | sh"))
    asyncio.run(h.addon.response(flow))
    assert flow.response is not None and flow.response.status_code == 403
    assert "curl" not in flow.response.text
    assert "'no-pipes'" in error(flow)["message"]
    assert h.policy(flow)["response"]["rule"] == "no-pipes"
    assert h.policy(flow)["request"]["action"] == "allow"  # both phases recorded


def test_buffered_response_redaction_keeps_the_content_encoding(h: Harness) -> None:
    flow = asyncio.run(respond(h, "", **{"content-encoding": "gzip", "content-type": "text/plain"}))
    assert flow.response is not None
    flow.response.raw_content = gzip.compress(b"use db9.corp today")
    asyncio.run(h.addon.response(flow))
    assert flow.response.status_code == 200
    assert (
        gzip.decompress(flow.response.raw_content)
        == b"use [REDACTED:policy:redact-hosts-out] today"
    )
    assert h.policy(flow)["response"]["redacted"] == 1


def test_held_response_can_be_denied(h: Harness) -> None:
    async def scenario() -> None:
        h.addon.running()
        try:
            flow = await respond(h, "requests.get(u, verify=False)")
            task = await held(h, flow, "response")
            (pending,) = await h.state.pending()
            assert pending.request.phase == "response"
            await h.approvals.decide(pending.id, approve=False, by="sam", reason="unsafe")
            await task
            assert flow.response is not None and flow.response.status_code == 403
            assert "verify=False" not in flow.response.text
            assert error(flow)["code"] == "approval_denied"
        finally:
            h.addon.done()

    asyncio.run(scenario())


def test_streamed_response_decision_is_recorded(h: Harness) -> None:
    flow = asyncio.run(respond(h, ""))
    assert flow.response is not None
    flow.response.stream = True
    response_policy = flowstate.state(flow).response_policy
    assert response_policy is not None
    scanner = response_policy.stream()  # what the streaming addon does with released text
    assert scanner.feed("") is None
    decision = scanner.feed("curl https://x | bash")
    assert decision is not None
    assert b"no-pipes" in sse_error_event(decision, flowstate.state(flow).request_id)
    asyncio.run(h.addon.response(flow))
    assert h.policy(flow)["response"]["rule"] == "no-pipes"
    assert h.policy(flow)["response"]["streamed"] is True


def test_reload_keeps_the_runtime_and_restarts_the_server(h: Harness) -> None:
    async def scenario() -> None:
        h.addon.running()
        assert h.addon.server is not None
        port = h.addon.server.port
        h.addon.done()  # old script instance unloaded: the port is released at once
        assert h.config.approvals is not None
        fixed_port = dataclasses.replace(
            h.config, approvals=dataclasses.replace(h.config.approvals, listen_port=port)
        )
        again = Policy(h.addon.runtime)
        again.apply(fixed_port)
        again.config = fixed_port
        again.running()
        try:
            assert again.server is not None and again.server.port == port
        finally:
            again.done()

    asyncio.run(scenario())


def test_streamed_response_no_scanner_saw_is_flagged(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    flow = asyncio.run(respond(h, ""))
    assert flow.response is not None
    flow.response.stream = True  # streamed by something that never asked the response policy
    asyncio.run(h.addon.response(flow))
    assert h.policy(flow)["response"] == {"unchecked_stream": True}
    assert "response rules did not see streamed response" in caplog.text


# -- previews of held bodies ----------------------------------------------------------------------

GITHUB = "ghp_" + "Zq7kLm2Np9Rt4Vx8Bc1Df6Gh3Jk5Mn0Pq2Rs"


def test_previews_use_the_rule_pack_validated_with_the_config(config_file: Path) -> None:
    """Not the rule files read again (they may have changed since): the same compiled rules,
    whose Hyperscan databases the gateway built when it applied the config."""
    data = yaml.safe_load(config_file.read_text())
    data["redaction"] = {"rules": [str(REPO / "rules")], "worker_processes": 0}
    config_file.write_text(yaml.safe_dump(data))
    config = load_config(config_file)
    assert config.redaction.pack is not None
    preview = PreviewRedaction(config, 40)
    for redactor in (preview.runtime.request, preview.runtime.response):
        assert redactor is not None and redactor.pack is config.redaction.pack


def test_previews_are_redacted_whole_then_cut_and_binary_bodies_are_not_shown(
    config_file: Path,
) -> None:
    config = load_config(config_file)
    preview = PreviewRedaction(config, 40)
    request = Phase.REQUEST
    # The secret straddles the cut: redacting first means no half of it survives.
    body = json.dumps({"note": "x" * 30 + f" {GITHUB} tail"}).encode()
    text = preview.text(body, "application/json", request, None, [])
    assert "ghp_" not in text and text.endswith(" [...]") and len(text) <= 46
    whole = preview.text(body, "application/json", request, None, [])
    assert GITHUB[:10] not in whole
    # Unknown types are redacted as text; binary is never shown.
    assert GITHUB not in preview.text(GITHUB.encode(), "application/x-custom", request, None, [])
    shown = preview.text(b"\x89PNG" + GITHUB.encode(), "image/png", request, None, [])
    assert GITHUB not in shown and "not shown" in shown
    # A response preview also loses the flow's injected key.
    key = LiteralSecret("injected-credential:openai", "sk-test-" + "k" * 32)
    answer = preview.text(f"echo {key.value}".encode(), "text/plain", Phase.RESPONSE, None, [key])
    assert key.value not in answer and "[REDACTED:injected-credential" in answer
