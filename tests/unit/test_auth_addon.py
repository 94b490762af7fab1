"""CallerAuth with mitmproxy's test flows: token sources, tunnels, refusals, stripping."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from mitmproxy import http

from sluicegate import flowstate
from sluicegate.addons.auth import TUNNELS, CallerAuth
from sluicegate.engine import tokens
from tests.support import attacks
from tests.support.addon_harness import client, configured, connect_flow, flow_to, run, write_config

if TYPE_CHECKING:
    from tests.support.tokens import TestIdP

CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "proxy-authorization")


@pytest.fixture
def make_auth(tmp_path: Path, idp: TestIdP) -> Iterator[Callable[..., CallerAuth]]:
    """CallerAuth configured with the test IdP and `auth` section overrides."""
    with contextlib.ExitStack() as stack:

        def make(**overrides: Any) -> CallerAuth:
            addon = CallerAuth()
            config = write_config(tmp_path, idp, auth={**idp.auth_config(), **overrides})
            stack.enter_context(configured(addon, config=config))
            assert addon.config is not None
            return addon

        yield make


@pytest.fixture
def auth(make_auth: Callable[..., CallerAuth]) -> CallerAuth:
    return make_auth()


def basic(token: str, user: str = "agent") -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def error_of(flow: http.HTTPFlow) -> dict[str, Any]:
    assert flow.response is not None
    return json.loads(flow.response.content)["error"]


def inner(auth: CallerAuth, headers: dict[str, str], **kw: Any) -> http.HTTPFlow:
    flow = flow_to("127.0.0.1", 443, headers=headers, **kw)
    run(auth.requestheaders(flow))
    return flow


def assert_stripped(flow: http.HTTPFlow) -> None:
    assert not any(name in flow.request.headers for name in CREDENTIAL_HEADERS)


# -- inner tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["authorization", "x-api-key", "api-key"])
def test_inner_token_attaches_the_caller_and_is_stripped(
    auth: CallerAuth, idp: TestIdP, header: str
) -> None:
    token = idp.mint("agent-bob", ["agents", "ops"])
    value = f"Bearer {token}" if header == "authorization" else token
    flow = inner(auth, {header: value, "content-type": "application/json"})
    assert flow.response is None
    caller = flowstate.state(flow).caller
    assert caller is not None
    assert (caller.subject, caller.groups) == ("agent-bob", ("agents", "ops"))
    assert caller.fingerprint == tokens.token_fingerprint(token)
    recorded = flow.metadata["sluicegate"]["caller"]
    assert (
        recorded["subject"] == "agent-bob" and recorded["issuer"] == idp.auth_config()["issuers"][0]
    )
    assert token not in json.dumps(flow.metadata["sluicegate"])
    assert_stripped(flow)
    assert flow.request.headers["content-type"] == "application/json"


@pytest.mark.parametrize("name", sorted(attacks.ATTACKS))
def test_rejected_inner_token_gets_401_with_reason_and_no_trace(
    auth: CallerAuth, idp: TestIdP, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    make, reason = attacks.ATTACKS[name]
    token = make(idp)
    caplog.set_level(logging.DEBUG)
    flow = inner(auth, {"authorization": f"Bearer {token}", "x-api-key": token})
    assert flow.response is not None and flow.response.status_code == 401
    assert error_of(flow)["code"] == reason
    assert "invalid_token" in flow.response.headers["www-authenticate"]
    assert flowstate.state(flow).caller is None
    assert flow.metadata["sluicegate"]["refusal"]["code"] == reason
    assert_stripped(flow)
    everything = flow.response.text + json.dumps(flow.metadata["sluicegate"]) + caplog.text
    assert token not in everything
    assert tokens.token_fingerprint(token) in caplog.text  # correlatable without the token


def test_different_tokens_in_two_inner_headers_are_ambiguous(
    auth: CallerAuth, idp: TestIdP
) -> None:
    flow = inner(auth, {"authorization": f"Bearer {idp.mint()}", "x-api-key": idp.mint("other")})
    assert flow.response is not None and flow.response.status_code == 401
    assert error_of(flow)["code"] == "ambiguous_token"
    assert_stripped(flow)


def test_no_token_outside_a_tunnel_asks_for_the_proxy_password(auth: CallerAuth) -> None:
    flow = inner(auth, {"authorization": "Basic dXNlcjpwYXNz"})
    assert flow.response is not None and flow.response.status_code == 407
    assert error_of(flow)["code"] == "missing_token"
    assert flow.response.headers["proxy-authenticate"] == 'Basic realm="sluicegate"'
    assert_stripped(flow)


# -- the proxy password -------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
def test_proxy_authorization_on_a_plain_proxy_request(
    auth: CallerAuth, idp: TestIdP, scheme: str
) -> None:
    token = idp.mint("agent-carol")
    value = basic(token) if scheme == "basic" else f"Bearer {token}"
    flow = inner(auth, {"proxy-authorization": value, "authorization": "Bearer placeholder"})
    assert flow.response is None
    assert flowstate.state(flow).caller.subject == "agent-carol"
    assert_stripped(flow)


def test_connect_token_covers_every_request_in_the_tunnel(auth: CallerAuth, idp: TestIdP) -> None:
    token = idp.mint("agent-dave", ["agents"])
    conn = client()
    connect = connect_flow(
        "127.0.0.1", 443, headers={"proxy-authorization": basic(token)}, client_conn=conn
    )
    run(auth.http_connect(connect))
    assert connect.response is None
    assert "proxy-authorization" not in connect.request.headers  # a CONNECT flow may be recorded
    assert flowstate.state(connect).caller.subject == "agent-dave"
    for _ in range(3):  # e.g. HTTP/2 streams: one client connection, many flows
        flow = inner(auth, {"authorization": "Bearer sk-placeholder"}, client_conn=conn)
        assert flow.response is None
        assert flowstate.state(flow).caller.subject == "agent-dave"
        assert_stripped(flow)
    # Another connection is not covered.
    stranger = inner(auth, {})
    assert stranger.response is not None and stranger.response.status_code == 407


def test_tunnel_is_forgotten_when_the_client_disconnects(auth: CallerAuth, idp: TestIdP) -> None:
    conn = client()
    run(
        auth.http_connect(
            connect_flow(
                "h", 443, headers={"proxy-authorization": basic(idp.mint())}, client_conn=conn
            )
        )
    )
    assert TUNNELS.token(conn) is not None
    auth.client_disconnected(conn)
    assert not TUNNELS.is_tunnel(conn)


@pytest.mark.parametrize("name", ["expired", "bad_signature", "malformed"])
def test_rejected_connect_gets_407_and_opens_no_tunnel(
    auth: CallerAuth, idp: TestIdP, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = {
        "expired": attacks.expired,
        "bad_signature": attacks.tampered_payload,
        "malformed": attacks.malformed_base64,
    }[name](idp)
    conn = client()
    connect = connect_flow(
        "h", 443, headers={"proxy-authorization": basic(token)}, client_conn=conn
    )
    run(auth.http_connect(connect))
    assert connect.response is not None and connect.response.status_code == 407
    assert error_of(connect)["code"] == name
    assert connect.response.headers["proxy-authenticate"].startswith("Basic ")
    assert "proxy-authorization" not in connect.request.headers
    assert not TUNNELS.is_tunnel(conn)
    assert token not in caplog.text + connect.response.text


def test_proxy_authorization_without_a_password_is_malformed(auth: CallerAuth) -> None:
    flow = inner(auth, {"proxy-authorization": basic("", user="agent")})
    assert flow.response is not None and flow.response.status_code == 407
    assert error_of(flow)["code"] == "malformed"


def test_tunnel_token_is_verified_again_for_each_request(auth: CallerAuth, idp: TestIdP) -> None:
    """A token that expires while its tunnel is open stops working at once."""
    token = idp.mint(ttl=600)
    conn = client()
    run(
        auth.http_connect(
            connect_flow("h", 443, headers={"proxy-authorization": basic(token)}, client_conn=conn)
        )
    )
    assert inner(auth, {}, client_conn=conn).response is None
    later = tokens.TokenVerifier(
        [tokens.JwksFileSource(idp.jwks_file, algorithms=["RS256"])],
        tokens.TokenPolicy(issuers=("https://idp.test.local",), audiences=("sluicegate",)),
        clock=lambda: 10**10,
    )
    auth._verifier = later
    flow = inner(auth, {}, client_conn=conn)
    assert flow.response is not None and flow.response.status_code == 407
    assert error_of(flow)["code"] == "expired"


def test_connect_without_credentials_defers_to_inner_tokens(auth: CallerAuth, idp: TestIdP) -> None:
    conn = client()
    connect = connect_flow("h", 443, client_conn=conn)
    run(auth.http_connect(connect))
    assert connect.response is None
    missing = inner(auth, {}, client_conn=conn)
    # Inside a tunnel the agent talks to "the API": answer like one.
    assert missing.response is not None and missing.response.status_code == 401
    assert error_of(missing)["code"] == "missing_token"
    assert missing.response.headers["www-authenticate"] == 'Bearer realm="sluicegate"'
    ok = inner(auth, {"x-api-key": idp.mint("agent-erin")}, client_conn=conn)
    assert ok.response is None and flowstate.state(ok).caller.subject == "agent-erin"


# -- configured token sources -------------------------------------------------------------------


def test_proxy_only_refuses_a_connect_without_credentials(
    make_auth: Callable[..., CallerAuth], idp: TestIdP
) -> None:
    auth = make_auth(token_sources=["proxy_authorization"])
    connect = connect_flow("h", 443)
    run(auth.http_connect(connect))
    assert connect.response is not None and connect.response.status_code == 407
    flow = inner(auth, {"authorization": f"Bearer {idp.mint()}"})
    assert flow.response is not None and flow.response.status_code == 407
    assert error_of(flow)["code"] == "missing_token"
    assert_stripped(flow)


def test_sources_not_configured_are_ignored_but_stripped(
    make_auth: Callable[..., CallerAuth], idp: TestIdP
) -> None:
    auth = make_auth(token_sources=["x_api_key"])
    token = idp.mint()
    flow = inner(auth, {"authorization": f"Bearer {token}", "proxy-authorization": basic(token)})
    assert flow.response is not None and flow.response.status_code == 401
    assert error_of(flow)["code"] == "missing_token"
    assert_stripped(flow)
    ok = inner(auth, {"x-api-key": token, "authorization": "Bearer other"})
    assert ok.response is None
    assert_stripped(ok)


def test_token_size_cap_comes_from_the_config(
    make_auth: Callable[..., CallerAuth], idp: TestIdP
) -> None:
    auth = make_auth(max_token_bytes=2000)
    flow = inner(auth, {"x-api-key": idp.mint(padding="x" * 1500)})
    assert error_of(flow)["code"] == "too_large"


def test_unconfigured_addon_refuses_everything(tmp_path: Path, idp: TestIdP) -> None:
    broken = {
        **idp.auth_config(),
        "keys": [{"id": "k", "jwks_file": "missing.json", "algorithms": ["RS256"]}],
    }
    addon = CallerAuth()
    with configured(addon, config=write_config(tmp_path, idp, auth=broken)):
        assert addon.config is None
        flow = flow_to("127.0.0.1", 443, headers={"authorization": f"Bearer {idp.mint()}"})
        run(addon.requestheaders(flow))
        assert flow.response is not None and flow.response.status_code == 503
        assert error_of(flow)["code"] == "gateway_not_configured"
