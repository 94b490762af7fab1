"""WebSockets through a real gateway: blocked by default, redacted both ways where allowed.

One gateway serves every test: route `realtime` allows WebSockets (binary messages blocked), route
`closed` does not; recording and the fault-injection script are loaded.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wsproto.events as ev
from mitmproxy import io

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support.gateway import REPO, Gateway, recording_section
from tests.support.pki import TestCA as CA
from tests.support.websocket import Rejected, WsClient, WsUpstream, say, say_bytes, ws_connect

FAULT_SCRIPT = REPO / "tests" / "support" / "fault_injection.py"
SECRET = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
TAG = "[REDACTED:github-token]"
ECHO_TAG = "[REDACTED:injected-credential:realtime]"


@pytest.fixture(scope="module")
def realtime(pki: CA) -> Iterator[WsUpstream]:
    server = WsUpstream(pki.issue("ws-realtime"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def closed(pki: CA) -> Iterator[WsUpstream]:
    server = WsUpstream(pki.issue("ws-closed"))
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _reset(realtime: WsUpstream, closed: WsUpstream) -> None:
    realtime.reset()
    closed.reset()


def ws_route(name: str, server: WsUpstream) -> dict[str, Any]:
    return {
        "name": name,
        "host": "127.0.0.1",
        "port": server.port,
        "credential": {"env": UPSTREAM_KEY_ENV},
    }


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    pki: CA,
    base_config: dict,
    realtime: WsUpstream,
    closed: WsUpstream,
) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("websocket-gateway")
    config = copy.deepcopy(base_config)
    config["routes"] += [ws_route("realtime", realtime), ws_route("closed", closed)]
    config["websockets"] = {"routes": ["realtime"], "binary": "block"}
    config["recording"] = recording_section(workdir / "recordings")
    gw = Gateway(
        config,
        workdir,
        upstream_ca=pki.cert_file,
        extra_args=("-s", str(FAULT_SCRIPT)),
        env={UPSTREAM_KEY_ENV: UPSTREAM_KEY},
    )
    gw.start()
    yield gw
    gw.stop()


def connect(gateway: Gateway, server: WsUpstream, token: str, **headers: str) -> WsClient:
    ca = str(gateway.ca_file)
    client = ws_connect(gateway.port or 0, server, token, ca_file=ca, headers=headers)
    assert isinstance(client, WsClient), client
    return client


def closed_with(client: WsClient) -> int | None:
    event = client.receive()
    assert isinstance(event, ev.CloseConnection), f"expected a close, got {event}"
    return event.code


def recorded(gateway: Gateway, marker: str) -> Any:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for path in sorted((gateway.workdir / "recordings").glob("*/*.mitm")):
            with path.open("rb") as f:
                for flow in io.FlowReader(f).stream():
                    if flow.request.headers.get("x-test-marker") == marker:
                        return flow
        time.sleep(0.1)
    raise AssertionError(f"no recorded flow {marker}")


def recording_bytes(gateway: Gateway) -> bytes:
    return b"".join(p.read_bytes() for p in (gateway.workdir / "recordings").rglob("*.mitm"))


# -- blocked by default ----------------------------------------------------------------------------


def test_an_upgrade_on_a_route_without_websockets_is_refused_before_the_upstream(
    gateway: Gateway, closed: WsUpstream, token: str
) -> None:
    answer = ws_connect(gateway.port or 0, closed, token, ca_file=str(gateway.ca_file))
    assert isinstance(answer, Rejected)
    assert answer.status == 403
    assert b'"websocket_blocked"' in answer.body
    assert closed.upgrades == []


# -- allowed route -------------------------------------------------------------------------------


def test_an_allowed_upgrade_gets_auth_routing_and_the_injected_credential(
    gateway: Gateway, realtime: WsUpstream, token: str
) -> None:
    with connect(gateway, realtime, token) as client:
        client.send("hello")
        assert client.text() == "hello"
    (upgrade,) = realtime.upgrades
    assert upgrade.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert token not in str(upgrade.headers)
    assert "proxy-authorization" not in upgrade.headers


def test_a_secret_is_redacted_in_both_directions(
    gateway: Gateway, realtime: WsUpstream, token: str
) -> None:
    with connect(gateway, realtime, token, **{"x-test-marker": "both-ways"}) as client:
        client.send(f'{{"type": "input", "text": "my token is {SECRET}"}}')
        up = client.text()
        client.send(say(f"the server knows {SECRET} too"))
        down = client.text()
    assert json.loads(realtime.received[0]) == {"type": "input", "text": f"my token is {TAG}"}
    assert SECRET not in up and TAG in up  # the echo of what arrived upstream
    assert down == f"the server knows {TAG} too"
    flow = recorded(gateway, "both-ways")
    contents = [m.text for m in flow.websocket.messages]
    assert contents == [realtime.received[0], up, realtime.received[1], down]
    assert all(SECRET not in text for text in contents)
    facts = flow.metadata["sluicegate"]["websocket"]
    assert facts["redaction"] == {"client": {"github-token": 1}, "server": {"github-token": 1}}
    assert facts["messages"] == 4 and facts["dropped"] == 0


def test_an_echoed_injected_credential_is_scrubbed(
    gateway: Gateway, realtime: WsUpstream, token: str
) -> None:
    with connect(gateway, realtime, token, **{"x-test-marker": "echo"}) as client:
        client.send("echo-credential")
        text = client.text()
    assert UPSTREAM_KEY not in text and ECHO_TAG in text
    recorded(gateway, "echo")
    assert UPSTREAM_KEY.encode() not in recording_bytes(gateway)


def test_binary_from_the_client_is_dropped_and_the_connection_closed(
    gateway: Gateway, realtime: WsUpstream, token: str
) -> None:
    payload = b"\x00\x01" + SECRET.encode()
    with connect(gateway, realtime, token, **{"x-test-marker": "binary-up"}) as client:
        client.send(payload)
        assert closed_with(client) == 1008
    assert realtime.received == []
    flow = recorded(gateway, "binary-up")
    (message,) = flow.websocket.messages[:1]
    assert message.dropped and payload not in message.content
    facts = flow.metadata["sluicegate"]["websocket"]
    assert facts["closed_by_gateway"] == "websocket_binary_blocked"
    assert SECRET.encode() not in recording_bytes(gateway)


def test_binary_from_the_server_never_reaches_the_client(
    gateway: Gateway, realtime: WsUpstream, token: str
) -> None:
    with connect(gateway, realtime, token) as client:
        client.send(say_bytes(SECRET.encode()))
        assert closed_with(client) == 1008
    assert realtime.received == [say_bytes(SECRET.encode())]


def test_a_fault_in_the_message_hook_drops_the_message_and_closes(
    gateway: Gateway, realtime: WsUpstream, token: str
) -> None:
    with connect(gateway, realtime, token, **{"x-test-fault": "WebSockets.websocket_message"}) as c:
        c.send(f"must not pass {SECRET}")
        assert closed_with(c) == 1011
    assert realtime.received == []
    logs = gateway.settled_logs()
    assert "websocket_error" in logs and "InjectedFault" in logs
    assert "SHOULD-NOT-APPEAR" not in logs and SECRET not in logs


def test_the_gateway_serves_new_websockets_after_closing_some(
    gateway: Gateway, realtime: WsUpstream, token: str
) -> None:
    for _ in range(3):
        with connect(gateway, realtime, token) as client:
            client.send(b"binary")
            assert closed_with(client) == 1008
    with connect(gateway, realtime, token) as client:
        client.send("still fine")
        assert client.text() == "still fine"


def test_websocket_config_names_existing_routes(tmp_path: Path, base_config: dict) -> None:
    config = {**base_config, "websockets": {"routes": ["nope"]}}
    gw = Gateway(config, tmp_path, env={UPSTREAM_KEY_ENV: UPSTREAM_KEY})
    assert gw.run_to_exit() != 0
    assert "websockets.routes[0]: no route named 'nope'" in gw.logs
