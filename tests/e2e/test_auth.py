"""Caller authentication through a real gateway: both token sources, the attack suite, HTTP/2.

Every refusal also proves that no upstream saw anything and that the token is not in the log.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import httpx
import pytest

from sluicegate.auth import devtokens
from tests.conftest import UPSTREAM_KEY
from tests.support import wire
from tests.support.attacks import ATTACKS
from tests.support.gateway import REPO, Gateway
from tests.support.tokens import TestIdP as IdP
from tests.support.upstream import FakeUpstream, Received

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def assert_forwarded_cleanly(got: Received, token: str) -> None:
    """What left the gateway: the real key (where routed), never the caller's credentials."""
    raw = got.raw()
    assert token.encode() not in raw
    assert "proxy-authorization" not in got.header_names()
    assert b"placeholder" not in raw


def assert_not_logged(gateway: Gateway, *tokens: str) -> None:
    logs = gateway.settled_logs()
    for token in tokens:
        assert token not in logs


# -- the two token sources ------------------------------------------------------------------------


def test_proxy_password_flavour_with_httpx(
    gateway: Gateway, upstream: FakeUpstream, token: str
) -> None:
    with gateway.client(token) as client:
        response = client.post(
            upstream.url("/v1/chat/completions"),
            json=CHAT,
            headers={"authorization": "Bearer sk-placeholder"},
        )
    assert response.status_code == 200
    (got,) = upstream.received
    assert got.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert_forwarded_cleanly(got, token)
    assert_not_logged(gateway, token, UPSTREAM_KEY)


def test_proxy_password_flavour_with_curl(
    gateway: Gateway, upstream: FakeUpstream, token: str
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed on this machine")
    out = subprocess.run(
        ["curl", "-sS", "-H", "authorization: Bearer sk-placeholder", upstream.url("/echo")],
        env=gateway.agent_env(token),
        capture_output=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    (got,) = upstream.received
    assert got.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert_forwarded_cleanly(got, token)
    assert_not_logged(gateway, token)


def test_plain_http_proxy_request_does_not_forward_proxy_authorization(
    gateway: Gateway, plain_upstream: FakeUpstream, token: str
) -> None:
    with gateway.client(token) as client:
        response = client.get(plain_upstream.url("/echo"))
    assert response.status_code == 200
    (got,) = plain_upstream.received
    assert_forwarded_cleanly(got, token)
    assert "authorization" not in got.header_names()  # `internal` has no credential
    assert_not_logged(gateway, token)


def test_plain_http_proxy_request_without_token_gets_407(
    gateway: Gateway, plain_upstream: FakeUpstream
) -> None:
    with gateway.client() as client:
        response = client.get(plain_upstream.url("/echo"))
    assert response.status_code == 407
    assert response.json()["error"]["code"] == "missing_token"
    assert response.headers["proxy-authenticate"] == 'Basic realm="sluicegate"'
    assert plain_upstream.received == []


@pytest.mark.parametrize("header", ["authorization", "x-api-key", "api-key"])
def test_inner_token_flavour(
    gateway: Gateway, upstream: FakeUpstream, token: str, header: str
) -> None:
    value = f"Bearer {token}" if header == "authorization" else token
    with gateway.client() as client:
        response = client.get(upstream.url("/echo"), headers={header: value})
    assert response.status_code == 200
    (got,) = upstream.received
    assert got.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert "x-api-key" not in got.header_names() and "api-key" not in got.header_names()
    assert_forwarded_cleanly(got, token)
    assert_not_logged(gateway, token)


def test_tunnel_without_any_token_gets_401(gateway: Gateway, upstream: FakeUpstream) -> None:
    with gateway.client() as client:
        response = client.get(upstream.url("/echo"), headers={"authorization": "Bearer sk-x"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "malformed"
    with gateway.client() as client:
        response = client.get(upstream.url("/echo"))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_token"
    assert upstream.received == []


# -- attack suite ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_as_inner_token_is_refused(
    gateway: Gateway, upstream: FakeUpstream, idp: IdP, attack: str
) -> None:
    make, reason = ATTACKS[attack]
    token = make(idp)
    with gateway.client() as client:
        response = client.post(
            upstream.url("/v1/chat/completions"),
            json=CHAT,
            headers={"authorization": f"Bearer {token}"},
        )
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == reason
    assert token not in response.text
    assert upstream.received == []
    assert f"caller token rejected: {reason}" in gateway.settled_logs()
    assert_not_logged(gateway, token)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_as_proxy_password_is_refused_at_connect(
    gateway: Gateway, upstream: FakeUpstream, idp: IdP, attack: str
) -> None:
    make, reason = ATTACKS[attack]
    token = make(idp)
    answer = wire.connect(gateway.port, f"127.0.0.1:{upstream.port}", wire.basic(token))
    assert answer.status == 407
    assert answer.code == reason
    assert answer.headers["proxy-authenticate"] == 'Basic realm="sluicegate"'
    assert upstream.received == []
    assert_not_logged(gateway, token)


@pytest.mark.parametrize("attack", ["expired", "alg_none", "unknown_kid"])
def test_attack_in_x_api_key_is_refused(
    gateway: Gateway, upstream: FakeUpstream, idp: IdP, attack: str
) -> None:
    make, reason = ATTACKS[attack]
    token = make(idp)
    with gateway.client() as client:
        response = client.get(upstream.url("/echo"), headers={"x-api-key": token})
    assert (response.status_code, response.json()["error"]["code"]) == (401, reason)
    assert upstream.received == []
    assert_not_logged(gateway, token)


def test_httpx_sees_a_refused_proxy_password_as_407(
    gateway: Gateway, upstream: FakeUpstream, idp: IdP
) -> None:
    token = idp.mint(ttl=-600)
    with pytest.raises(httpx.ProxyError, match="407"), gateway.client(token) as client:
        client.get(upstream.url("/echo"))
    assert upstream.received == []
    assert_not_logged(gateway, token)


def test_group_not_allowed_on_the_route(gateway: Gateway, upstream: FakeUpstream, idp: IdP) -> None:
    token = idp.mint("contractor", ["contractors"])
    with gateway.client() as client:
        response = client.get(upstream.url("/echo"), headers={"authorization": f"Bearer {token}"})
    assert (response.status_code, response.json()["error"]["code"]) == (403, "group_not_allowed")
    # As proxy password the tunnel itself is refused: no route there admits the caller.
    answer = wire.connect(gateway.port, f"127.0.0.1:{upstream.port}", wire.basic(token))
    assert (answer.status, answer.code) == (403, "group_not_allowed")
    assert upstream.received == []
    assert_not_logged(gateway, token)


def test_two_different_tokens_are_ambiguous(
    gateway: Gateway, upstream: FakeUpstream, idp: IdP
) -> None:
    first, second = idp.mint(), idp.mint("someone-else")
    with gateway.client() as client:
        response = client.get(
            upstream.url("/echo"),
            headers={"authorization": f"Bearer {first}", "x-api-key": second},
        )
    assert (response.status_code, response.json()["error"]["code"]) == (401, "ambiguous_token")
    assert upstream.received == []
    assert_not_logged(gateway, first, second)


# -- the destination is what the gateway connects to, never the Host header ----------------------


def test_host_header_naming_a_routed_host_does_not_open_another_destination(
    gateway: Gateway, upstream: FakeUpstream, other_upstream: FakeUpstream, token: str
) -> None:
    routed_host = f"127.0.0.1:{upstream.port}"
    with pytest.raises(httpx.ProxyError, match="403"), gateway.client(token) as client:
        client.get(other_upstream.url("/echo"), headers={"host": routed_host})
    with pytest.raises(httpx.ProxyError, match="403"), gateway.client() as client:
        client.get(
            other_upstream.url("/echo"),
            headers={"host": routed_host, "authorization": f"Bearer {token}"},
        )
    answer = wire.connect(gateway.port, f"127.0.0.1:{other_upstream.port}", wire.basic(token))
    assert (answer.status, answer.code) == (403, "egress_denied")
    assert other_upstream.received == [] and upstream.received == []
    assert_not_logged(gateway, token)


def test_host_header_in_passthrough_mode_gets_no_credential(
    start_gateway, upstream: FakeUpstream, other_upstream: FakeUpstream, token: str
) -> None:
    # The unrouted upstream is on the loopback: only listed internal destinations pass through.
    allow = [f"127.0.0.1:{other_upstream.port}"]
    gw = start_gateway(lambda cfg: cfg.update(unrouted="passthrough", allow_internal=allow))
    routed_host = f"127.0.0.1:{upstream.port}"
    with gw.client(token) as client:
        response = client.get(other_upstream.url("/echo"), headers={"host": routed_host})
    assert response.status_code == 200
    (got,) = other_upstream.received
    assert got.header("host") == routed_host
    assert UPSTREAM_KEY.encode() not in got.raw()
    assert "authorization" not in got.header_names()
    assert_forwarded_cleanly(got, token)
    assert upstream.received == []


def test_sni_naming_another_host_inside_a_routed_tunnel_is_denied(
    gateway: Gateway, upstream: FakeUpstream, token: str
) -> None:
    """CONNECT to the routed address, but TLS for another name: the upstream would be verified
    against that name, so the route (and its credential) does not apply."""
    answer = wire.get_in_tunnel(
        gateway.port,
        f"127.0.0.1:{upstream.port}",
        wire.basic(token),
        context=gateway.ssl_context(),
        server_hostname="localhost",
    )
    assert (answer.status, answer.code) == (403, "egress_denied")
    assert upstream.received == []


# -- HTTP/2: many streams, one tunnel, one identity ---------------------------------------------


def client_connects(gateway: Gateway) -> int:
    return gateway.settled_logs().count("client connect")


class PreferHttp2(ssl.SSLContext):
    """httpx offers ALPN `http/1.1, h2` inside a proxy tunnel and mitmproxy honours the client's
    first choice; agents built on curl, Go or Node offer h2 first. Do that."""

    def set_alpn_protocols(self, protocols: Iterable[str]) -> None:
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


def http2_client(gateway: Gateway, token: str | None = None) -> httpx.Client:
    context = PreferHttp2(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(gateway.ca_file)
    return httpx.Client(http2=True, proxy=gateway.proxy_url(token), verify=context, timeout=20)


def test_http2_streams_in_one_tunnel_carry_the_proxy_identity(
    gateway: Gateway, upstream: FakeUpstream, token: str
) -> None:
    before = client_connects(gateway)
    with http2_client(gateway, token) as client:
        responses = [client.post(upstream.url("/v1/chat/completions"), json=CHAT) for _ in range(4)]
    assert [r.http_version for r in responses] == ["HTTP/2"] * 4
    assert [r.status_code for r in responses] == [200] * 4
    assert client_connects(gateway) - before == 1
    assert len(upstream.received) == 4
    for got in upstream.received:
        assert got.header("authorization") == f"Bearer {UPSTREAM_KEY}"
        assert_forwarded_cleanly(got, token)
    assert_not_logged(gateway, token)


def test_http2_streams_with_inner_tokens_are_verified_one_by_one(
    gateway: Gateway, upstream: FakeUpstream, idp: IdP, token: str
) -> None:
    expired = idp.mint(ttl=-600)
    with http2_client(gateway) as client:
        good = client.get(upstream.url("/echo"), headers={"authorization": f"Bearer {token}"})
        bad = client.get(upstream.url("/echo"), headers={"authorization": f"Bearer {expired}"})
        again = client.get(upstream.url("/echo"), headers={"x-api-key": token})
    assert (good.http_version, good.status_code) == ("HTTP/2", 200)
    assert (bad.status_code, bad.json()["error"]["code"]) == (401, "expired")
    assert again.status_code == 200
    assert len(upstream.received) == 2
    assert_not_logged(gateway, token, expired)


# -- key sources ----------------------------------------------------------------------------------


def test_jwks_url_is_fetched_and_refetched_for_a_new_kid(
    start_gateway,
    tmp_path: Path,
    upstream: FakeUpstream,
    plain_upstream: FakeUpstream,
    idp: IdP,
) -> None:
    rotated = IdP(tmp_path / "idp2", kid="test-key-2")
    published = {"keys": json.loads(idp.jwks_file.read_text())["keys"]}

    def jwks(responder, received) -> None:
        responder.send_json(published)

    plain_upstream.handle("GET", "/jwks.json", jwks)

    def edit(cfg: dict) -> None:
        cfg["auth"]["keys"] = [
            {"id": "idp", "jwks_url": plain_upstream.url("/jwks.json"), "algorithms": ["RS256"]}
        ]
        cfg["auth"]["jwks_refetch_min_seconds"] = 0

    gw = start_gateway(edit)
    new_token = rotated.mint()
    with gw.client(idp.mint()) as client:
        assert client.get(upstream.url("/echo")).status_code == 200
    answer = wire.connect(gw.port, f"127.0.0.1:{upstream.port}", wire.basic(new_token))
    assert (answer.status, answer.code) == (407, "unknown_kid")
    # The IdP publishes its new key: the next unknown kid triggers a refetch.
    published["keys"] += json.loads(rotated.jwks_file.read_text())["keys"]
    with gw.client(new_token) as client:
        assert client.get(upstream.url("/echo")).status_code == 200
    assert [r.path for r in plain_upstream.received].count("/jwks.json") >= 2
    assert len(upstream.received) == 2


def test_bad_key_file_is_reported_by_check_config(tmp_path: Path, base_config: dict) -> None:
    import yaml

    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "x"}]}')
    config = {**base_config, "auth": {**base_config["auth"]}}
    config["auth"]["keys"] = [{"id": "k", "jwks_file": str(jwks), "algorithms": ["RS256"]}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "sluicegate", "check-config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "addons")},
        timeout=60,
    )
    assert result.returncode == 1
    assert "auth.keys[0]: jwks file" in result.stderr and "no usable keys" in result.stderr


# -- mint-token ---------------------------------------------------------------------------------


def mint(config: Path, key: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sluicegate", "mint-token", "--config", str(config)]
    return subprocess.run(
        [*command, "--key", str(key), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "addons")},
        timeout=60,
    )


def test_mint_token_makes_a_dev_token_the_gateway_accepts(
    start_gateway, tmp_path: Path, upstream: FakeUpstream
) -> None:
    files = devtokens.generate_signing_key(tmp_path / "dev-signing-key", "dev")

    def edit(cfg: dict) -> None:
        cfg["auth"] = {
            "keys": [{"id": "dev", "jwks_file": str(files.jwks), "algorithms": ["RS256"]}],
            "issuers": ["sluicegate-dev"],
            "audiences": ["sluicegate"],
        }

    gw = start_gateway(edit)
    assert gw.config_file is not None
    result = mint(gw.config_file, files.private_key, "--sub", "dev-alice", "--groups", "agents")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    with gw.client(token) as client:
        assert client.get(upstream.url("/echo")).status_code == 200
    (got,) = upstream.received
    assert got.header("authorization") == f"Bearer {UPSTREAM_KEY}"

    # Wrong group: minted fine, refused by the route.
    result = mint(gw.config_file, files.private_key, "--sub", "dev-bob", "--groups", "other")
    answer = wire.connect(gw.port, f"127.0.0.1:{upstream.port}", wire.basic(result.stdout.strip()))
    assert (answer.status, answer.code) == (403, "group_not_allowed")


def test_mint_token_refuses_a_production_config(tmp_path: Path, base_config: dict) -> None:
    import yaml

    files = devtokens.generate_signing_key(tmp_path / "keys", "dev")
    config = {**base_config, "gateway": {"name": "prod", "environment": "production"}}
    path = tmp_path / "prod.yaml"
    path.write_text(yaml.safe_dump(config))
    result = mint(path, files.private_key, "--sub", "x", "--groups", "agents")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "environment is 'production'" in result.stderr


def test_mint_token_refuses_a_key_the_config_does_not_trust(
    tmp_path: Path, base_config: dict
) -> None:
    import yaml

    files = devtokens.generate_signing_key(tmp_path / "keys", "dev")
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(base_config))  # trusts the test IdP, not this key
    result = mint(path, files.private_key, "--sub", "x", "--groups", "agents")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "would reject this token (unknown_kid)" in result.stderr
