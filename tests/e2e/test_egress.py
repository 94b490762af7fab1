"""`unrouted: passthrough` does not open the gateway host's loopback, private networks or metadata.

An agent allowed to reach any destination must still not reach the gateway host itself (the
approvals API, local services), the networks behind it or a cloud metadata service, by any
spelling of the address (`2130706433`, `0x7f.1`, `[::ffff:127.0.0.1]`) or by a DNS name that
resolves there, including one whose answer changes between the gateway's check and its connection
(DNS rebinding). Names under `.test` resolve as tests/support/fake_dns.py is told.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support import wire
from tests.support.gateway import REPO, Gateway
from tests.support.pki import TestCA as CA
from tests.support.upstream import FakeUpstream, free_port

FAKE_DNS = REPO / "tests" / "support" / "fake_dns.py"
ADMIN_ENV = "SLUICEGATE_TEST_EGRESS_ADMIN"
ADMIN_TOKEN = "egress-admin-token-0123456789abcdef"
DNS = {
    "loopback.test": ["127.0.0.1"],
    "v6loopback.test": ["::1"],
    "private.test": ["10.20.30.40"],
    "cgnat.test": ["100.100.100.200"],
    "metadata.test": ["169.254.169.254"],
    "rebind.test": ["203.0.113.7", "127.0.0.1"],
    "allowed.test": ["127.0.0.1"],
}


@pytest.fixture(scope="module")
def local_service() -> Iterator[FakeUpstream]:
    """A plain-HTTP service on the gateway host's loopback that no route names."""
    server = FakeUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def allowed_service() -> Iterator[FakeUpstream]:
    """A loopback service `allow_internal` opens to unrouted traffic."""
    server = FakeUpstream()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _reset_services(request: pytest.FixtureRequest) -> None:
    for name in ("local_service", "allowed_service"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()


def dns_env(**extra: str) -> dict[str, str]:
    return {
        UPSTREAM_KEY_ENV: UPSTREAM_KEY,
        ADMIN_ENV: ADMIN_TOKEN,
        "SLUICEGATE_TEST_DNS": json.dumps(DNS),
        **extra,
    }


@pytest.fixture(scope="module")
def approvals_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def egress_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    pki: CA,
    base_config: dict,
    allowed_service: FakeUpstream,
    approvals_port: int,
) -> Iterator[Gateway]:
    config = copy.deepcopy(base_config)
    config["unrouted"] = "passthrough"
    config["allow_internal"] = [
        f"127.0.0.1:{allowed_service.port}",
        f"allowed.test:{allowed_service.port + 1}",
    ]
    config["approvals"] = {"admin_token": {"env": ADMIN_ENV}, "listen_port": approvals_port}
    gw = Gateway(
        config,
        tmp_path_factory.mktemp("egress-gateway"),
        upstream_ca=pki.cert_file,
        extra_args=["-s", str(FAKE_DNS)],
        env=dns_env(),
    )
    gw.start()
    yield gw
    gw.stop()


def plain_get(gateway: Gateway, token: str, url: str) -> httpx.Response:
    """A plain-HTTP proxy request (absolute-form): no CONNECT, the request names the host."""
    with gateway.client(token) as client:
        return client.get(url)


def code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


def internal_targets(port: int) -> list[str]:
    return [
        f"127.0.0.1:{port}",
        f"127.1:{port}",
        f"2130706433:{port}",
        f"0x7f.1:{port}",
        f"0177.0.0.1:{port}",
        f"0x7f000001:{port}",
        f"[::1]:{port}",
        f"[::ffff:127.0.0.1]:{port}",
        f"[::ffff:7f00:1]:{port}",
        f"[64:ff9b::7f00:1]:{port}",
        f"localhost:{port}",
        f"LocalHost.:{port}",
        f"api.localhost:{port}",
        f"0.0.0.0:{port}",
        "169.254.169.254:80",
        "[fd00:ec2::254]:80",
        "metadata.google.internal:80",
        "10.0.0.1:443",
        "172.16.0.1:443",
        "192.168.1.1:443",
        "100.64.0.1:443",
        "[fe80::1]:443",
        "[fd12:3456::1]:443",
    ]


def test_tunnels_to_internal_addresses_are_refused_in_any_spelling(
    egress_gateway: Gateway, other_upstream: FakeUpstream, token: str
) -> None:
    """The HTTPS upstream on 127.0.0.1 is not named by any route: no spelling reaches it."""
    for target in internal_targets(other_upstream.port):
        answer = wire.connect(egress_gateway.port, target, wire.basic(token))
        assert (answer.status, answer.code) == (403, "egress_internal"), target
        assert "internal address" in answer.json()["error"]["message"]
    assert other_upstream.received == []


def test_plain_requests_to_internal_addresses_are_refused(
    egress_gateway: Gateway, local_service: FakeUpstream, token: str
) -> None:
    port = local_service.port  # (IPv6 spellings: the tunnel test; httpx drops their brackets)
    for host in ("127.0.0.1", "2130706433", "0x7f.1", "017700000001", "localhost", "127.1"):
        response = plain_get(egress_gateway, token, f"http://{host}:{port}/echo")
        assert (response.status_code, code(response)) == (403, "egress_internal"), host
    assert local_service.received == []


def test_the_approvals_api_on_the_gateway_host_is_not_reachable_through_it(
    egress_gateway: Gateway, approvals_port: int, token: str
) -> None:
    direct = httpx.get(f"http://127.0.0.1:{approvals_port}/v1/approvals", timeout=10)
    assert direct.status_code == 401  # it is there, on the gateway host's loopback
    for host in ("127.0.0.1", "localhost", "2130706433"):
        url = f"http://{host}:{approvals_port}/v1/approvals"
        response = plain_get(egress_gateway, token, url)
        assert (response.status_code, code(response)) == (403, "egress_internal")


@pytest.mark.parametrize(
    "name", ["loopback.test", "v6loopback.test", "private.test", "cgnat.test", "metadata.test"]
)
def test_names_resolving_to_internal_addresses_are_refused(
    egress_gateway: Gateway, local_service: FakeUpstream, token: str, name: str
) -> None:
    response = plain_get(egress_gateway, token, f"http://{name}:{local_service.port}/echo")
    assert (response.status_code, code(response)) == (403, "egress_internal")
    assert local_service.received == []


def test_a_name_resolving_to_loopback_is_refused_inside_a_tunnel(
    egress_gateway: Gateway, other_upstream: FakeUpstream, token: str
) -> None:
    with egress_gateway.client(token) as client:
        response = client.get(f"https://loopback.test:{other_upstream.port}/echo")
    assert (response.status_code, code(response)) == (403, "egress_internal")
    assert other_upstream.received == []


def test_dns_rebinding_between_check_and_connect_does_not_reach_the_loopback(
    egress_gateway: Gateway, local_service: FakeUpstream, token: str
) -> None:
    """The first answer (a public address) passes the early check; the connection's own lookup
    answers 127.0.0.1, and that is the address judged and connected to: refused."""
    response = plain_get(egress_gateway, token, f"http://rebind.test:{local_service.port}/echo")
    assert (response.status_code, code(response)) == (403, "egress_internal")
    assert local_service.received == []
    logs = egress_gateway.settled_logs()
    assert "egress refused: rebind.test" in logs
    # Resolved twice (the early check, the connection), never a third time behind the check.
    assert logs.count("fake-dns: rebind.test ->") == 2


def test_allow_internal_opens_what_it_lists_and_nothing_else(
    egress_gateway: Gateway, allowed_service: FakeUpstream, local_service: FakeUpstream, token: str
) -> None:
    for host in ("127.0.0.1", "allowed.test"):
        response = plain_get(egress_gateway, token, f"http://{host}:{allowed_service.port}/echo")
        assert response.status_code == 200, host
        assert UPSTREAM_KEY not in response.text and token not in response.text
    assert len(allowed_service.received) == 2
    refused = plain_get(egress_gateway, token, f"http://allowed.test:{local_service.port}/echo")
    assert refused.status_code == 403
    assert local_service.received == []


def test_routes_reach_the_internal_destinations_they_name(
    egress_gateway: Gateway, upstream: FakeUpstream, plain_upstream: FakeUpstream, token: str
) -> None:
    """The test routes name 127.0.0.1 and their ports: those stay reachable."""
    with egress_gateway.client(token) as client:
        assert client.get(plain_upstream.url("/echo")).status_code == 200
        assert client.post(upstream.url("/v1/chat/completions"), json={}).status_code == 200
    assert upstream.received[0].header("authorization") == f"Bearer {UPSTREAM_KEY}"


def test_passthrough_warns_at_start_up_what_it_allows(egress_gateway: Gateway) -> None:
    logs = egress_gateway.logs
    assert "unrouted: passthrough: authenticated callers reach ANY public destination" in logs
    assert "Internal addresses (loopback, private, link-local, CGNAT, cloud metadata)" in logs


def test_wildcard_routes_do_not_name_internal_addresses(
    start_gateway: Any, local_service: FakeUpstream, token: str
) -> None:
    """A route for `*.test` is no licence for whatever a name under it resolves to."""

    def edit(cfg: dict) -> None:
        cfg["routes"].append(
            {"name": "wild", "host": "*.test", "port": local_service.port, "scheme": "http"}
        )

    gw = start_gateway(edit, extra_args=("-s", str(FAKE_DNS)), env=dns_env())
    response = plain_get(gw, token, f"http://loopback.test:{local_service.port}/echo")
    assert (response.status_code, code(response)) == (403, "egress_internal")
    assert local_service.received == []
    assert "unrouted: passthrough" not in gw.logs


def test_public_addresses_in_unusual_spellings_are_refused(
    egress_gateway: Gateway, token: str
) -> None:
    """`1572395042` is 93.184.216.34: a policy `hosts` rule naming the address would miss it."""
    for target in ("1572395042:443", "0x5db8d822:443", "93.184.55834:443"):
        answer = wire.connect(egress_gateway.port, target, wire.basic(token))
        assert (answer.status, answer.code) == (400, "invalid_host"), target
