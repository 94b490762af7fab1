"""CredentialInjection: inject last, rotate without restart, conceal once sent, scrub echoes."""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from sluicegate.mitm import flowstate, guard
from sluicegate.mitm.credentials import CredentialInjection
from sluicegate.mitm.routing import Routing
from sluicegate.redaction.echo import secret_variants
from tests.support.addon_harness import configured, flow_to, write_config

if TYPE_CHECKING:
    from tests.support.tokens import TestIdP

AGENT = flowstate.Caller("agent-alice", ("agents",), "https://idp", None, "f" * 16)
SECRET = "sk-test-0123456789abcdefSECRET"


@dataclass
class Chain:
    routing: Routing
    credentials: CredentialInjection
    key_file: Path

    def send(self, flow: http.HTTPFlow) -> http.HTTPFlow:
        """Run the request phase as the gateway does: route, then inject."""
        flowstate.state(flow).caller = AGENT
        self.routing.requestheaders(flow)
        self.credentials.request(flow)
        return flow

    def rotate(self, secret: str) -> None:
        fresh = self.key_file.with_suffix(".new")
        fresh.write_text(secret + "\n")
        os.replace(fresh, self.key_file)


@pytest.fixture
def chain(tmp_path: Path, idp: TestIdP) -> Iterator[Chain]:
    key_file = tmp_path / "openai-key"
    key_file.write_text(SECRET + "\n")
    routes = [
        {
            "name": "openai",
            "host": "api.openai.com",
            "credential": {"file": str(key_file)},
        },
        {
            "name": "anthropic",
            "host": "api.anthropic.com",
            "credential": {"file": str(key_file)},
            "inject": {"header": "x-api-key", "template": "{secret}"},
        },
        {"name": "open", "host": "open.example"},
    ]
    config = write_config(tmp_path, idp, routes=routes)
    routing, credentials = Routing(), CredentialInjection()
    with configured(routing, credentials, config=config):
        assert routing.config is not None and credentials.config is not None
        yield Chain(routing, credentials, key_file)


def code_of(flow: http.HTTPFlow) -> str:
    assert flow.response is not None
    return json.loads(flow.response.content)["error"]["code"]


def respond(flow: http.HTTPFlow, headers: dict[str, str] | None = None) -> None:
    flow.response = tutils.tresp(
        headers=http.Headers([(k.encode(), v.encode()) for k, v in (headers or {}).items()])
    )


def test_credential_is_injected_with_the_route_template(chain: Chain) -> None:
    flow = chain.send(flow_to("api.openai.com", 443, headers={"authorization": "Bearer x"}))
    assert flow.request.headers.get_all("authorization") == [f"Bearer {SECRET}"]
    other = chain.send(flow_to("api.anthropic.com", 443, headers={"x-api-key": "placeholder"}))
    assert other.request.headers.get_all("x-api-key") == [SECRET]
    scrub = flowstate.state(other).scrub
    assert flowstate.ScrubLiteral("injected-credential:anthropic", SECRET) in scrub
    assert SECRET not in json.dumps(other.metadata["sluicegate"])


def test_routes_without_a_credential_and_unrouted_flows_get_nothing(chain: Chain) -> None:
    flow = chain.send(flow_to("open.example", 443))
    assert flow.response is None
    assert "authorization" not in flow.request.headers
    assert flowstate.state(flow).scrub == []


def test_rotated_secret_file_is_used_without_a_restart(chain: Chain) -> None:
    first = chain.send(flow_to("api.openai.com", 443))
    chain.rotate("sk-test-rotated-9876543210")
    second = chain.send(flow_to("api.openai.com", 443))
    assert first.request.headers["authorization"] == f"Bearer {SECRET}"
    assert second.request.headers["authorization"] == "Bearer sk-test-rotated-9876543210"
    # The scrub literals (kept per route and secret) follow the rotation: echoes of the new
    # secret are masked, in every encoding, and the old one is no longer this flow's secret.
    scrubbed = {lit.value for lit in flowstate.state(second).scrub}
    assert scrubbed == set(secret_variants("sk-test-rotated-9876543210"))
    assert {lit.value for lit in flowstate.state(first).scrub} == set(secret_variants(SECRET))
    third = chain.send(flow_to("api.openai.com", 443))
    assert {lit.value for lit in flowstate.state(third).scrub} == scrubbed


def test_marker_replaces_the_secret_once_the_response_arrives(chain: Chain) -> None:
    flow = chain.send(flow_to("api.openai.com", 443))
    respond(flow)
    chain.credentials.responseheaders(flow)
    assert flow.request.headers["authorization"] == "Bearer [credential:openai]"
    chain.credentials.response(flow)
    assert flow.request.headers["authorization"] == "Bearer [credential:openai]"
    # The response redaction addons still need to know what to mask.
    values = [s.value for s in flowstate.state(flow).scrub]
    assert values == secret_variants(SECRET)
    assert SECRET in values and base64.b64encode(SECRET.encode()).decode() in values
    assert {s.rule_id for s in flowstate.state(flow).scrub} == {"injected-credential:openai"}


def test_marker_replaces_the_secret_when_the_flow_fails(chain: Chain) -> None:
    flow = chain.send(flow_to("api.openai.com", 443))
    flow.error = tflow.terr("connection refused")
    chain.credentials.error(flow)
    assert flow.request.headers["authorization"] == "Bearer [credential:openai]"


def test_marker_is_restored_even_after_another_addon_refused_the_response(chain: Chain) -> None:
    flow = chain.send(flow_to("api.openai.com", 443))
    respond(flow)
    guard.answer(flow, 403, "blocked_by_policy", "Blocked.", phase="responseheaders")
    chain.credentials.responseheaders(flow)
    assert SECRET not in str(flow.request.headers)


def test_echoed_secret_is_scrubbed_from_response_headers(chain: Chain) -> None:
    flow = chain.send(flow_to("api.openai.com", 443))
    respond(
        flow,
        {
            "x-debug-auth": f"Bearer {SECRET}",
            "www-authenticate": f'Bearer error="invalid_token", key="{SECRET}"',
            "content-type": "application/json",
        },
    )
    chain.credentials.responseheaders(flow)
    headers = flow.response.headers
    assert SECRET not in str(headers)
    assert headers["x-debug-auth"] == "Bearer [REDACTED:injected-credential:openai]"
    assert headers["content-type"] == "application/json"


def test_destination_changed_after_routing_gets_no_secret(chain: Chain) -> None:
    flow = flow_to("api.openai.com", 443)
    flowstate.state(flow).caller = AGENT
    chain.routing.requestheaders(flow)
    flow.request.host = "attacker.example"  # e.g. an addon redirecting the flow
    chain.credentials.request(flow)
    assert code_of(flow) == "destination_changed"
    assert "authorization" not in flow.request.headers


def test_unavailable_secret_refuses_the_flow(chain: Chain) -> None:
    chain.key_file.unlink()
    flow = chain.send(flow_to("api.openai.com", 443))
    assert flow.response.status_code == 503
    assert code_of(flow) == "credential_unavailable"
    assert "authorization" not in flow.request.headers


def test_secret_that_would_split_the_header_is_refused(
    chain: Chain, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    chain.rotate("sk-test-abc\r\nx-injected: yes")
    flow = chain.send(flow_to("api.openai.com", 443))
    assert code_of(flow) == "credential_invalid"
    assert "x-injected" not in flow.response.text + caplog.text
    assert "authorization" not in flow.request.headers
