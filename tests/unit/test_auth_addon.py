"""CallerAuth with mitmproxy's test flows: token sources, tunnels, refusals, stripping."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt as pyjwt
import pytest
from mitmproxy import http

from sluicegate.auth import keys, verifier
from sluicegate.config import ConfigError, build_verifier, load_config
from sluicegate.mitm import flowstate
from sluicegate.mitm.auth import TUNNELS, CallerAuth
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
    assert caller.fingerprint == verifier.token_fingerprint(token)
    recorded = flow.metadata["sluicegate"]["caller"]
    assert (
        recorded["subject"] == "agent-bob" and recorded["issuer"] == idp.auth_config()["issuers"][0]
    )
    assert token not in json.dumps(flow.metadata["sluicegate"])
    assert_stripped(flow)
    assert flow.request.headers["content-type"] == "application/json"
    # An echo of the token anywhere is masked by response redaction and the recorder.
    fingerprint = verifier.token_fingerprint(token)
    assert flowstate.state(flow).scrub == [
        flowstate.ScrubLiteral(f"caller-token:{fingerprint}", token)
    ]


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
    assert verifier.token_fingerprint(token) in caplog.text  # correlatable without the token
    assert token in [literal.value for literal in flowstate.state(flow).scrub]


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


def test_short_non_tokens_are_not_scrub_literals(auth: CallerAuth) -> None:
    """Masking "x" everywhere would mangle the recording (keys like proxy_mode included)."""
    flow = inner(auth, {"proxy-authorization": basic("x")})
    assert error_of(flow)["code"] == "malformed"
    assert flowstate.state(flow).scrub == []
    real_looking = "sk-proj-" + "A" * 40
    flow = inner(auth, {"x-api-key": real_looking})
    assert error_of(flow)["code"] == "malformed"
    assert [lit.value for lit in flowstate.state(flow).scrub] == [real_looking]


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
    later = verifier.TokenVerifier(
        [keys.JwksFileSource(idp.jwks_file, algorithms=["RS256"])],
        verifier.TokenPolicy(issuers=("https://idp.test.local",), audiences=("sluicegate",)),
        clock=lambda: 10**10,
    )
    auth._verifier = later
    flow = inner(auth, {}, client_conn=conn)
    assert flow.response is not None and flow.response.status_code == 407
    assert error_of(flow)["code"] == "expired"


def test_tunnel_token_expiring_mid_tunnel_is_refused_at_expiry(
    auth: CallerAuth, idp: TestIdP
) -> None:
    """The verifier remembers the token's signature; expiry is still checked on every request."""
    now = [1_000_000.0]
    auth._verifier = verifier.TokenVerifier(
        [keys.JwksFileSource(idp.jwks_file, algorithms=["RS256"])],
        verifier.TokenPolicy(
            issuers=("https://idp.test.local",), audiences=("sluicegate",), leeway_seconds=0
        ),
        clock=lambda: now[0],
    )
    token = idp.mint(iat=int(now[0]), nbf=int(now[0]), exp=int(now[0]) + 60)
    conn = client()
    run(
        auth.http_connect(
            connect_flow("h", 443, headers={"proxy-authorization": basic(token)}, client_conn=conn)
        )
    )
    for second in (0, 30, 59):
        now[0] = 1_000_000.0 + second
        assert inner(auth, {}, client_conn=conn).response is None
    now[0] = 1_000_000.0 + 60
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


# -- the auth config section -------------------------------------------------------------------


def auth_problems(tmp_path: Path, idp: TestIdP, **overrides: Any) -> list[str]:
    path = write_config(tmp_path, idp, auth={**idp.auth_config(), **overrides})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return [f"{p.path}: {p.message}" for p in e.value.problems]


def one_key(**key: Any) -> dict[str, Any]:
    return {"keys": [{"id": "k", "algorithms": ["RS256"], **key}]}


def test_defaults_match_the_engine_policy(tmp_path: Path, idp: TestIdP) -> None:
    auth = load_config(write_config(tmp_path, idp)).auth
    policy = verifier.TokenPolicy(issuers=("i",), audiences=("a",))
    assert auth.max_token_bytes == policy.max_token_bytes
    assert auth.leeway_seconds == policy.leeway_seconds
    assert auth.required_claims == policy.required_claims
    assert auth.groups_claim == policy.groups_claim


def test_key_files_are_loaded_at_validation_and_problems_named_by_key(
    tmp_path: Path, idp: TestIdP
) -> None:
    empty = tmp_path / "empty.jwks"
    empty.write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0c2VjcmV0", "kid": "x"}]}')
    assert auth_problems(tmp_path, idp, **one_key(jwks_file=str(empty))) == [
        f"auth.keys[0]: jwks file {empty}: no usable keys"
    ]
    private = tmp_path / "private.pem"
    private.write_bytes(b"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n")
    (problem,) = auth_problems(tmp_path, idp, **one_key(public_key_file=str(private)))
    assert problem.startswith("auth.keys[0]: pem file") and "holds a private key" in problem
    (problem,) = auth_problems(tmp_path, idp, **one_key(jwks_file=str(tmp_path / "nope.json")))
    assert problem.startswith("auth.keys[0]: jwks file") and "cannot read" in problem


@pytest.mark.parametrize(
    "url", ["http://idp.example/jwks", "http://127.0.0.1.evil.example/jwks", "ftp://idp/jwks"]
)
def test_jwks_url_must_be_https_except_to_loopback(tmp_path: Path, idp: TestIdP, url: str) -> None:
    (problem,) = auth_problems(tmp_path, idp, **one_key(jwks_url=url))
    assert problem.startswith("auth.keys[0]: jwks url") and "must be https" in problem


def test_jwks_url_to_loopback_is_accepted_without_fetching(tmp_path: Path, idp: TestIdP) -> None:
    auth = {**idp.auth_config(), **one_key(jwks_url="http://127.0.0.1:9/jwks.json")}
    config = load_config(write_config(tmp_path, idp, auth=auth))
    assert config.auth.keys[0].jwks_url == "http://127.0.0.1:9/jwks.json"


def test_short_hmac_secret_is_refused_without_echoing_it(
    tmp_path: Path, idp: TestIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICEGATE_TEST_HMAC", "short-secret-value")
    key = {"hmac_secret": {"env": "SLUICEGATE_TEST_HMAC"}, "algorithms": ["HS256"], "kid": "h"}
    (problem,) = auth_problems(tmp_path, idp, **one_key(**key))
    assert problem.startswith("auth.keys[0]:") and "shorter than 32 bytes" in problem
    assert "short-secret-value" not in problem


def test_hmac_key_verifies_hs256_only_when_configured(
    tmp_path: Path, idp: TestIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "s" * 48
    monkeypatch.setenv("SLUICEGATE_TEST_HMAC", secret)
    hmac_key = {
        "id": "h",
        "hmac_secret": {"env": "SLUICEGATE_TEST_HMAC"},
        "kid": "h1",
        "algorithms": ["HS256"],
    }
    auth = {**idp.auth_config(), "keys": [*idp.auth_config()["keys"], hmac_key]}
    verifier = build_verifier(load_config(write_config(tmp_path, idp, auth=auth)).auth)
    claims = attacks.claims(idp)
    hs_token = pyjwt.encode(claims, secret, algorithm="HS256", headers={"kid": "h1"})
    assert verifier.verify(hs_token).subject == claims["sub"]
    assert verifier.verify(idp.mint("rs")).subject == "rs"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"leeway_seconds": -1}, "auth.leeway_seconds: must not be negative"),
        ({"max_token_bytes": 0}, "auth.max_token_bytes: must be positive"),
        ({"max_token_age_seconds": 0}, "auth.max_token_age_seconds: must be positive"),
        ({"jwks_cache_seconds": 0}, "auth.jwks_cache_seconds: must be between 1 and 86400"),
        ({"issuers": [""]}, "auth.issuers[0]: must not be empty"),
        ({"groups_claim": ""}, "auth.groups_claim: must not be empty"),
        ({"token_sources": ["cookie"]}, "auth.token_sources[0]: must be one of"),
        (one_key(jwks_file="x.json", public_key_file="y.pem"), "auth.keys[0]: needs exactly one"),
        (one_key(jwks_url="https://idp/jwks", kid="k1"), "auth.keys[0].kid: a JWKS names"),
        (one_key(jwks_url="https://idp/jwks", algorithms=["HS256"]), "auth.keys[0].algorithms[0]"),
    ],
)
def test_auth_section_is_strict(
    tmp_path: Path, idp: TestIdP, overrides: dict[str, Any], expected: str
) -> None:
    problems = auth_problems(tmp_path, idp, **overrides)
    assert any(p.startswith(expected) for p in problems), problems
