"""Routing and policy judge one reading of the path, and the upstream receives exactly that one.

A route with a `path_prefix` holds a scoped key; paths an upstream could resolve outside the prefix
(`..;` for Tomcat/Spring, `%2e%2e;`, `..%00`) must not get it. A policy rule blocking `/v1/admin`
must not be stepped around with `;x`, `%3b`, `\\`, `%00` or another case. Raw sockets send the
bytes as written (libraries normalise some of them away); an HTTP/2 client sends the rest.
"""

from __future__ import annotations

import copy
import ssl
from collections.abc import Iterable, Iterator

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support import wire
from tests.support.gateway import Gateway
from tests.support.pki import TestCA as CA
from tests.support.upstream import FakeUpstream


@pytest.fixture(scope="module")
def paths_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    pki: CA,
    base_config: dict,
    upstream: FakeUpstream,
    other_upstream: FakeUpstream,
) -> Iterator[Gateway]:
    """`safe`: a scoped key for `/v1/safe` only. `open`: another upstream, no key, where a policy
    rule blocks `/v1/admin`."""
    config = copy.deepcopy(base_config)
    config["routes"] = [
        {
            **config["routes"][0],
            "name": "safe",
            "path_prefix": "/v1/safe",
        },
        {"name": "open", "host": "127.0.0.1", "port": other_upstream.port},
    ]
    config["policy"] = {
        "rules": [
            {
                "id": "no-admin",
                "action": "block",
                "message": "Admin endpoints are off limits.",
                "match": {"routes": ["open"], "paths": ["/v1/admin(/.*)?"]},
            }
        ]
    }
    gw = Gateway(
        config,
        tmp_path_factory.mktemp("paths-gateway"),
        upstream_ca=pki.cert_file,
        env={UPSTREAM_KEY_ENV: UPSTREAM_KEY},
    )
    gw.start()
    yield gw
    gw.stop()


def get_raw(gateway: Gateway, port: int, path: str, token: str) -> wire.RawResponse:
    """GET `path` exactly as written, over HTTP/1.1 in a CONNECT tunnel."""
    return wire.get_in_tunnel(
        gateway.port,
        f"127.0.0.1:{port}",
        wire.basic(token),
        context=gateway.ssl_context(),
        server_hostname="127.0.0.1",
        path=path,
    )


class PreferHttp2(ssl.SSLContext):
    def set_alpn_protocols(self, protocols: Iterable[str]) -> None:
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


def http2_client(gateway: Gateway, token: str) -> httpx.Client:
    context = PreferHttp2(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(gateway.ca_file)
    return httpx.Client(http2=True, proxy=gateway.proxy_url(token), verify=context, timeout=20)


ESCAPES_FROM_THE_PREFIX = [
    "/v1/safe/..;/admin",
    "/v1/safe/%2e%2e;/admin",
    "/v1/safe/%2E%2E%3B/admin",
    "/v1/safe/..%00/admin",
    "/v1/safe/..%2Fadmin",
    "/v1/safe/..%5Cadmin",
    "/v1/safe/..\\admin",
    "/v1/safe/%252e%252e/admin",
    "/v1/safe/.%2e/admin",
    "/v1/safe//../admin",
    "/v1/safe;/../admin",
    "/v1/safe/x#/../../admin",
]


@pytest.mark.parametrize("path", ESCAPES_FROM_THE_PREFIX)
def test_no_path_leaves_the_prefix_with_its_scoped_key(
    paths_gateway: Gateway, upstream: FakeUpstream, token: str, path: str
) -> None:
    answer = get_raw(paths_gateway, upstream.port, path, token)
    assert (answer.status, answer.code) == (400, "invalid_path")
    assert "upstreams may read differently" in answer.json()["error"]["message"]
    assert upstream.received == []


BLOCKED_SPELLINGS = [
    "/v1/admin;x",
    "/v1/admin%3bx",
    "/v1/admin%3Bx/keys",
    "/v1\\admin",
    "/v1%5cadmin",
    "/v1/admin%00",
    "/v1/admin%00.json",
    "/v1//admin",
    "/v1/admin%2Fkeys",
]


@pytest.mark.parametrize("path", BLOCKED_SPELLINGS)
def test_ambiguous_spellings_of_a_blocked_path_are_refused(
    paths_gateway: Gateway, other_upstream: FakeUpstream, token: str, path: str
) -> None:
    answer = get_raw(paths_gateway, other_upstream.port, path, token)
    assert (answer.status, answer.code) == (400, "invalid_path")
    assert other_upstream.received == []


@pytest.mark.parametrize("path", ["/v1/Admin", "/V1/ADMIN/keys", "/v1/%41dmin", "/v1/%61dmin/x"])
def test_policy_path_rules_ignore_case_and_encoding(
    paths_gateway: Gateway, other_upstream: FakeUpstream, token: str, path: str
) -> None:
    answer = get_raw(paths_gateway, other_upstream.port, path, token)
    assert (answer.status, answer.code) == (403, "policy_blocked")
    assert other_upstream.received == []


def test_http2_paths_are_judged_the_same_way(
    paths_gateway: Gateway, upstream: FakeUpstream, other_upstream: FakeUpstream, token: str
) -> None:
    with http2_client(paths_gateway, token) as client:
        escape = client.get(upstream.url("/v1/safe/..;/admin"))
        semicolon = client.get(other_upstream.url("/v1/admin;x"))
        case = client.get(other_upstream.url("/v1/ADMIN"))
    assert [r.http_version for r in (escape, semicolon, case)] == ["HTTP/2"] * 3
    assert escape.status_code == 400 and escape.json()["error"]["code"] == "invalid_path"
    assert semicolon.status_code == 400
    assert case.status_code == 403 and case.json()["error"]["code"] == "policy_blocked"
    assert upstream.received == [] and other_upstream.received == []


def test_upstream_receives_exactly_the_path_that_was_judged(
    paths_gateway: Gateway, upstream: FakeUpstream, other_upstream: FakeUpstream, token: str
) -> None:
    """Equivalent spellings (RFC 3986 6.2.2) are forwarded in the canonical one: the key goes to
    the path the route matched, and the query is left as it was."""
    sent = {
        "/v1/safe/%66iles?x=%2e%2e;y": "/v1/safe/files?x=%2e%2e;y",
        "/v1/safe/f%c3%a9/%7euser": "/v1/safe/f%C3%A9/~user",
        "/v1/safe/models/gpt:generate": "/v1/safe/models/gpt:generate",
        "/v1/safe/": "/v1/safe/",
    }
    for path in sent:
        answer = get_raw(paths_gateway, upstream.port, path, token)
        assert answer.status == 404  # the fake upstream has no such endpoint; it got there
    assert [got.path for got in upstream.received] == list(sent.values())
    assert all(got.header("authorization") == f"Bearer {UPSTREAM_KEY}" for got in upstream.received)
    # Outside the prefix there is no route: nothing leaves.
    outside = get_raw(paths_gateway, upstream.port, "/v1/saferoom", token)
    assert (outside.status, outside.code) == (403, "egress_denied")
    assert get_raw(paths_gateway, other_upstream.port, "/v1/administrators", token).status == 404
    assert [got.path for got in other_upstream.received] == ["/v1/administrators"]
