"""Routing: route matching on the verified destination, the egress allowlist, the group check."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import http

from sluicegate.config import ConfigError, Route, load_config
from sluicegate.egress.paths import prefix_covers
from sluicegate.mitm import flowstate
from sluicegate.mitm.routing import (
    Destination,
    RouteTable,
    Routing,
    chosen_route,
    host_matches,
    judged_path,
)
from tests.support.addon_harness import configured, connect_flow, flow_to, write_config

if TYPE_CHECKING:
    from tests.support.tokens import TestIdP

AGENT = flowstate.Caller("agent-alice", ("agents",), "https://idp", None, "f" * 16)
OUTSIDER = flowstate.Caller("mallory", ("contractors",), "https://idp", None, "e" * 16)

ROUTES = [
    {"name": "openai", "host": "api.openai.com", "groups": ["agents"]},
    {"name": "azure", "host": "*.openai.azure.com", "path_prefix": "/openai"},
    {
        "name": "azure-admin",
        "host": "*.openai.azure.com",
        "path_prefix": "/openai/admin",
        "groups": ["ops"],
    },
    {"name": "exact-azure", "host": "team.openai.azure.com"},
    {"name": "internal", "host": "10.0.0.7", "port": 8080, "scheme": "http"},
]


@pytest.fixture
def make_routing(tmp_path: Path, idp: TestIdP) -> Iterator[Callable[..., Routing]]:
    with contextlib.ExitStack() as stack:

        def make(**sections: Any) -> Routing:
            addon = Routing()
            config = write_config(tmp_path, idp, **{"routes": ROUTES, **sections})
            stack.enter_context(configured(addon, config=config))
            assert addon.config is not None
            return addon

        yield make


@pytest.fixture
def routing(make_routing: Callable[..., Routing]) -> Routing:
    return make_routing()


def route(flow: http.HTTPFlow, routing: Routing, caller: flowstate.Caller | None = AGENT) -> None:
    flowstate.state(flow).caller = caller
    routing.requestheaders(flow)


def code_of(flow: http.HTTPFlow) -> str | None:
    if flow.response is None:
        return None
    return json.loads(flow.response.content)["error"]["code"]


# -- matching -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("api.openai.com", "api.openai.com", True),
        ("API.OpenAI.com", "api.openai.com", True),
        ("api.openai.com", "api.openai.com.evil.net", False),
        ("api.openai.com", "evilapi.openai.com", False),
        ("*.openai.azure.com", "team.openai.azure.com", True),
        ("*.openai.azure.com", "a.b.openai.azure.com", True),
        ("*.openai.azure.com", "openai.azure.com", False),
        ("*.openai.azure.com", "evilopenai.azure.com", False),
        ("::1", "::1", True),
    ],
)
def test_host_matches(pattern: str, host: str, expected: bool) -> None:
    assert host_matches(pattern, host) is expected


@given(st.from_regex(r"[a-z]{1,8}(\.[a-z]{1,8}){0,3}", fullmatch=True))
def test_wildcard_covers_exactly_the_proper_subdomains(host: str) -> None:
    assert host_matches("*.example.com", host) == host.endswith(".example.com")
    assert host_matches("*.example.com", f"{host}.example.com")
    assert not host_matches("*.example.com", f"{host}example.com")


@given(st.from_regex(r"(/[a-z0-9.%]{0,6}){1,5}", fullmatch=True))
def test_path_prefix_is_matched_segment_wise(path: str) -> None:
    if prefix_covers("/v1", path):
        assert path == "/v1" or path.startswith("/v1/")
    assert prefix_covers("/", path)
    assert prefix_covers("/v1", "/v1" + path)
    assert not prefix_covers("/v1", "/v1x" + path)


def test_most_specific_route_wins() -> None:
    table = RouteTable(
        [
            Route(name="wild", host="*.example.com"),
            Route(name="wild-deep", host="*.eu.example.com"),
            Route(name="exact", host="api.eu.example.com"),
            Route(name="exact-v2", host="api.eu.example.com", path_prefix="/v2"),
        ]
    )
    flow = flow_to("api.eu.example.com", 443)
    dest = Destination.of(flow)
    assert table.match(dest, "/v2/x").name == "exact-v2"
    assert table.match(dest, "/v1/x").name == "exact"
    other = Destination.of(flow_to("x.eu.example.com", 443))
    assert table.match(other, "/").name == "wild-deep"
    assert table.match(Destination.of(flow_to("x.example.com", 443)), "/").name == "wild"
    assert table.match(Destination.of(flow_to("x.example.com", 8443)), "/") is None


# -- the addon ----------------------------------------------------------------------------------


def test_routed_flow_records_its_route(routing: Routing) -> None:
    flow = flow_to("api.openai.com", 443, headers={"host": "api.openai.com"})
    route(flow, routing)
    assert flow.response is None
    assert flowstate.state(flow).route == "openai"
    assert flow.metadata["sluicegate"]["route"] == "openai"
    assert chosen_route(flow).name == "openai"


def test_host_header_does_not_choose_the_route(routing: Routing) -> None:
    """The agent controls Host; the route follows where the request really goes."""
    flow = flow_to("attacker.example", 443, headers={"host": "api.openai.com"})
    route(flow, routing)
    assert flow.response.status_code == 403
    assert code_of(flow) == "egress_denied"
    assert chosen_route(flow) is None


def test_tls_name_must_fit_the_route_too(routing: Routing) -> None:
    # The certificate would be checked against the SNI, not the routed host: not this route.
    flow = flow_to("api.openai.com", 443, sni="attacker.example")
    route(flow, routing)
    assert code_of(flow) == "egress_denied"
    client_sni = flow_to("api.openai.com", 443)
    client_sni.client_conn.sni = "attacker.example"
    route(client_sni, routing)
    assert code_of(client_sni) == "egress_denied"
    same = flow_to("api.openai.com", 443, sni="API.openai.com.")
    route(same, routing)
    assert same.response is None


def test_scheme_and_port_are_part_of_the_route(routing: Routing) -> None:
    cleartext = flow_to("api.openai.com", 80, scheme="http")
    route(cleartext, routing)
    assert code_of(cleartext) == "egress_denied"
    internal = flow_to("10.0.0.7", 8080, scheme="http")
    route(internal, routing)
    assert internal.response is None and chosen_route(internal).name == "internal"


def test_path_prefix_and_specificity(routing: Routing) -> None:
    admin = flow_to("eu.openai.azure.com", 443, path="/openai/admin/keys")
    route(admin, routing)
    assert code_of(admin) == "group_not_allowed"  # azure-admin needs `ops`
    assert flowstate.state(admin).route == "azure-admin"
    chat = flow_to("eu.openai.azure.com", 443, path="/openai/deployments/x?api-version=1")
    route(chat, routing)
    assert chat.response is None and chosen_route(chat).name == "azure"
    outside = flow_to("eu.openai.azure.com", 443, path="/openaiX")
    route(outside, routing)
    assert code_of(outside) == "egress_denied"
    exact = flow_to("team.openai.azure.com", 443, path="/anything")
    route(exact, routing)
    assert chosen_route(exact).name == "exact-azure"


def test_caller_outside_the_route_groups_is_refused(routing: Routing) -> None:
    flow = flow_to("api.openai.com", 443)
    route(flow, routing, OUTSIDER)
    assert flow.response.status_code == 403
    assert code_of(flow) == "group_not_allowed"
    assert chosen_route(flow) is None


@pytest.mark.parametrize(
    "path", ["/openai/%2e%2e/admin/keys", "/openai/..;/admin", "/openai\\x", "/openai/x%00"]
)
def test_ambiguous_paths_are_refused(routing: Routing, path: str) -> None:
    flow = flow_to("eu.openai.azure.com", 443, path=path)
    route(flow, routing)
    assert flow.response.status_code == 400
    assert code_of(flow) == "invalid_path"
    assert chosen_route(flow) is None


def test_the_request_path_becomes_the_canonical_one(routing: Routing) -> None:
    flow = flow_to("eu.openai.azure.com", 443, path="/%6fpenai/f%c3%a9?q=%2e")
    route(flow, routing)
    assert flow.response is None
    assert chosen_route(flow).name == "azure"
    assert flow.request.path == "/openai/f%C3%A9?q=%2e"
    assert judged_path(flow) == "/openai/fé"


def test_route_prefixes_are_matched_case_sensitively(routing: Routing) -> None:
    flow = flow_to("eu.openai.azure.com", 443, path="/OpenAI/x")
    route(flow, routing)
    assert code_of(flow) == "egress_denied"


def test_a_route_prefix_must_be_a_canonical_path(tmp_path: Path, idp: TestIdP) -> None:
    routes = [{"name": "bad", "host": "api.openai.com", "path_prefix": "/v1/..;/admin"}]
    with pytest.raises(ConfigError, match=r"routes\[0\]\.path_prefix"):
        load_config(write_config(tmp_path, idp, routes=routes))


def test_flow_without_a_verified_caller_fails_closed(routing: Routing) -> None:
    flow = flow_to("api.openai.com", 443)
    route(flow, routing, caller=None)
    assert flow.response.status_code == 500
    assert code_of(flow) == "gateway_error"


def test_passthrough_forwards_unrouted_flows_without_a_route(
    make_routing: Callable[..., Routing],
) -> None:
    routing = make_routing(unrouted="passthrough")
    flow = flow_to("elsewhere.example", 443)
    route(flow, routing)
    assert flow.response is None
    assert chosen_route(flow) is None
    assert flow.metadata["sluicegate"]["route"] is None
    # A routed destination still enforces its groups.
    guarded = flow_to("api.openai.com", 443)
    route(guarded, routing, OUTSIDER)
    assert code_of(guarded) == "group_not_allowed"


# -- CONNECT: the allowlist before any TLS -------------------------------------------------------


def connect(routing: Routing, host: str, port: int, caller: flowstate.Caller | None) -> str | None:
    flow = connect_flow(host, port)
    flowstate.state(flow).caller = caller
    routing.http_connect(flow)
    return code_of(flow)


def test_connect_to_an_unrouted_destination_is_denied(routing: Routing) -> None:
    assert connect(routing, "attacker.example", 443, None) == "egress_denied"
    assert connect(routing, "api.openai.com", 8443, AGENT) == "egress_denied"
    assert connect(routing, "api.openai.com", 443, None) is None  # inner token decides later
    assert connect(routing, "x.openai.azure.com", 443, OUTSIDER) is None  # `azure`: any group


def test_connect_by_a_caller_no_route_admits_is_denied(routing: Routing) -> None:
    assert connect(routing, "api.openai.com", 443, OUTSIDER) == "group_not_allowed"
    assert connect(routing, "api.openai.com", 443, AGENT) is None


def test_connect_in_passthrough_mode_is_not_checked(make_routing: Callable[..., Routing]) -> None:
    routing = make_routing(unrouted="passthrough")
    assert connect(routing, "attacker.example", 443, OUTSIDER) is None


# -- the routes config ----------------------------------------------------------------------------


def route_problems(tmp_path: Path, idp: TestIdP, *routes: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, idp, routes=list(routes)))
    return [f"{p.path}: {p.message}" for p in e.value.problems]


@pytest.mark.parametrize(
    "host",
    [
        "api.example.com:443",
        "*.",
        "a.*.example.com",
        "*example.com",
        "https://api.example.com",
        "user@api.example.com",
        "api..example.com",
        "*.::1",
        "fe80::1%eth0",
        "",
    ],
)
def test_route_host_must_be_a_bare_host_or_a_leading_wildcard(
    tmp_path: Path, idp: TestIdP, host: str
) -> None:
    problems = route_problems(tmp_path, idp, {"name": "r", "host": host})
    assert any(p.startswith("routes[0].host: must be a host name") for p in problems), problems


@pytest.mark.parametrize("host", ["api.example.com", "*.openai.azure.com", "10.0.0.7", "::1"])
def test_valid_route_hosts(tmp_path: Path, idp: TestIdP, host: str) -> None:
    config = load_config(write_config(tmp_path, idp, routes=[{"name": "r", "host": host}]))
    assert config.routes[0].host == host


def test_two_routes_for_the_same_destination_and_prefix_are_refused(
    tmp_path: Path, idp: TestIdP
) -> None:
    problems = route_problems(
        tmp_path,
        idp,
        {"name": "a", "host": "API.example.com", "path_prefix": "/v1"},
        {"name": "b", "host": "api.example.com", "path_prefix": "/v1/"},
    )
    assert problems == ["routes[1]: same host, port, scheme and path_prefix as routes[0] ('a')"]


@pytest.mark.parametrize(
    ("inject", "expected"),
    [
        ({"header": "host"}, "routes[0].inject.header: 'host' cannot carry a credential"),
        ({"header": "Proxy-Authorization"}, "routes[0].inject.header: 'Proxy-Authorization'"),
        ({"header": "x api key"}, "routes[0].inject.header: must be a valid header name"),
        ({"template": "Bearer"}, "routes[0].inject.template: must contain `{secret}` exactly"),
        ({"template": "Bearer {secret}\r\nx: y"}, "routes[0].inject.template: must be printable"),
    ],
)
def test_inject_settings_are_checked(
    tmp_path: Path,
    idp: TestIdP,
    monkeypatch: pytest.MonkeyPatch,
    inject: dict[str, str],
    expected: str,
) -> None:
    monkeypatch.setenv("SLUICEGATE_TEST_KEY", "sk-test")
    route = {"name": "r", "host": "h.example", "credential": {"env": "SLUICEGATE_TEST_KEY"}}
    problems = route_problems(tmp_path, idp, {**route, "inject": inject})
    assert any(p.startswith(expected) for p in problems), problems
