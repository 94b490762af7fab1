"""Every answer the gateway gives is the documented JSON error or the upstream's answer, and each
names its request: mitmproxy's own error answers (upstream unreachable, TLS verification failed,
a malformed upstream answer, an unparseable request) included, over HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_auth import http2_client
from tests.e2e.test_faults import raw_exchange
from tests.support.gateway import Gateway
from tests.support.pki import TestCA
from tests.support.upstream import FakeUpstream

UUID_LEN = 36


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def untrusted_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeUpstream]:
    """An HTTPS upstream whose certificate comes from a CA the gateway does not trust."""
    server = FakeUpstream(TestCA(tmp_path_factory.mktemp("rogue"), "rogue CA").issue("rogue"))
    yield server
    server.close()


def route(name: str, port: int) -> dict:
    return {
        "name": name,
        "host": "127.0.0.1",
        "port": port,
        "groups": ["agents"],
        "credential": {"env": "SLUICEGATE_TEST_UPSTREAM_KEY"},
        "inject": {"header": "authorization", "template": "Bearer {secret}"},
    }


@pytest.fixture
def gw(start_gateway, untrusted_upstream: FakeUpstream, tmp_path: Path) -> Gateway:
    dead = closed_port()

    def edit(cfg: dict) -> None:
        cfg["routes"] += [route("dead", dead), route("rogue", untrusted_upstream.port)]

    gw = start_gateway(edit)
    gw.dead_port = dead  # type: ignore[attr-defined]
    return gw


def assert_gateway_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["code"], error["type"]) == (code, "sluicegate_error")
    rid = response.headers["x-sluicegate-request-id"]
    assert error["request_id"] == rid and len(rid) == UUID_LEN
    assert "<html" not in response.text.lower() and "mitmproxy" not in response.text.lower()


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_unreachable_upstream_is_a_json_502_with_the_request_id(
    gw: Gateway, token: str, http2: bool
) -> None:
    url = f"https://127.0.0.1:{gw.dead_port}/v1/models"  # type: ignore[attr-defined]
    with http2_client(gw, token) if http2 else gw.client(token) as client:
        response = client.get(url)
        assert_gateway_error(response, 502, "upstream_unreachable")
        if http2:
            assert response.http_version == "HTTP/2"
        # The connection stays usable (HTTP/1.1 keep-alive, HTTP/2 stream) for the next request.
        again = client.get(url)
        assert_gateway_error(again, 502, "upstream_unreachable")
        assert (
            again.headers["x-sluicegate-request-id"] != response.headers["x-sluicegate-request-id"]
        )
    logs = gw.settled_logs()
    assert (
        f"upstream_unreachable (502) [request {response.headers['x-sluicegate-request-id']}]"
        in logs
    )


def test_upstream_tls_verification_failure_is_a_json_502(
    gw: Gateway, untrusted_upstream: FakeUpstream, token: str
) -> None:
    with gw.client(token) as client:
        response = client.post(
            f"https://127.0.0.1:{untrusted_upstream.port}/v1/chat/completions", json={"x": 1}
        )
    assert_gateway_error(response, 502, "upstream_tls_failed")
    assert untrusted_upstream.received == []  # nothing (and no key) went to the impostor


def test_allowed_answers_carry_the_request_id_too(
    gateway: Gateway, upstream: FakeUpstream, token: str
) -> None:
    with gateway.client(token) as client:
        response = client.post(upstream.url("/v1/chat/completions"), json={"messages": []})
        streamed = client.post(
            upstream.url("/v1/chat/completions"), json={"messages": [], "stream": True}
        )
    assert response.status_code == 200
    assert len(response.headers["x-sluicegate-request-id"]) == UUID_LEN
    assert streamed.status_code == 200
    assert len(streamed.headers["x-sluicegate-request-id"]) == UUID_LEN
    assert (
        streamed.headers["x-sluicegate-request-id"] != response.headers["x-sluicegate-request-id"]
    )


def test_a_spoofed_request_id_from_the_upstream_is_replaced(
    gateway: Gateway, upstream: FakeUpstream, token: str
) -> None:
    upstream.handle(
        "GET",
        "/spoof",
        lambda r, got: r.send(200, b"{}", headers={"x-sluicegate-request-id": "upstream-chosen"}),
    )
    with gateway.client(token) as client:
        response = client.get(upstream.url("/spoof"))
    assert response.status_code == 200
    assert response.headers.get_list("x-sluicegate-request-id") != ["upstream-chosen"]
    assert len(response.headers.get_list("x-sluicegate-request-id")) == 1


def test_an_unparseable_request_head_gets_a_json_400(gateway: Gateway) -> None:
    answer = raw_exchange(gateway, b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and error["type"] == "sluicegate_error"
    assert f"x-sluicegate-request-id: {error['request_id']}".encode() in head.lower()


def test_the_gateway_used_as_a_base_url_explains_itself(gateway: Gateway) -> None:
    """OPENAI_BASE_URL=http://gateway:port/v1 by mistake: the request is for the gateway itself."""
    for host in ("127.0.0.1", "localhost"):
        response = httpx.post(
            f"http://{host}:{gateway.port}/v1/chat/completions",
            json={"messages": []},
            headers={"authorization": "Bearer sk-placeholder"},
        )
        assert_gateway_error(response, 400, "not_a_proxy_request")
        message = response.json()["error"]["message"]
        assert "HTTPS_PROXY=http://agent:<token>@" in message and "agent-env" in message


def test_a_local_service_refused_gets_a_no_proxy_hint(gateway: Gateway, token: str) -> None:
    with gateway.client(token) as client:
        internal = client.get(f"http://localhost:{closed_port()}/health")
        local = client.get("http://db.internal:5432/health")
        public = client.get("http://example.com/")
    # unrouted: deny refuses it before its address is looked at; both refusals carry the hint
    assert_gateway_error(internal, 403, "egress_denied")
    assert "add localhost to NO_PROXY" in internal.json()["error"]["message"]
    assert_gateway_error(local, 403, "egress_denied")
    assert "add db.internal to NO_PROXY" in local.json()["error"]["message"]
    assert_gateway_error(public, 403, "egress_denied")
    assert "NO_PROXY" not in public.json()["error"]["message"]  # no such hint for the internet
