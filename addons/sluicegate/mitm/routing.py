"""Routing: match a flow's verified upstream to a route; the egress allowlist; the group check.

A route is chosen by where the request really goes, never by the Host header (the agent controls
it): the host and port mitmproxy connects to (`flow.request.host`/`port`: the CONNECT target in a
tunnel, the absolute URL of a plain proxy request) and, for https, every name the upstream
certificate may be verified against (the TLS server name sent upstream is the client's SNI or the
host; mitmproxy never runs with `ssl_insecure` here). All of them must fit the route's host.

Unrouted destinations are refused with 403 `egress_denied` (already at CONNECT, before any TLS)
unless `unrouted: passthrough`, which forwards them without any credential. A caller outside the
route's `groups` gets 403 `group_not_allowed`.

Internal addresses (loopback, private, link-local, CGNAT, cloud metadata: `egress/addresses.py`)
are refused with 403 `egress_internal` unless a route with an exact host names the destination or
`allow_internal` lists it: by name without DNS at CONNECT and `requestheaders` (`2130706433`,
`[::1]`, `localhost`), by resolved address in `request`, and finally on the address the
connection really goes to (mitmcompat/upstream_connect.py, which resolves once and connects only
to checked addresses, so a DNS answer that changes in between cannot reach the loopback).

The path is read once, by `egress.paths.canonical_path`: an ambiguous path is refused (400
`invalid_path`), a canonical one replaces the request's path if it was spelled differently, and
its decoded form is what route prefixes here and policy rules later match (`judged_path`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from mitmproxy import http

from sluicegate import config as config_mod
from sluicegate.config import Route, normalize_host
from sluicegate.egress.addresses import (
    EgressGuard,
    InternalAllowance,
    literal_address,
    unusual_ipv4,
)
from sluicegate.egress.paths import AmbiguousPath, RequestPath, canonical_path, prefix_covers
from sluicegate.mitm import flowstate, guard
from sluicegate.mitm.base import GatewayAddon
from sluicegate.mitm.base_url import is_base_url_flow
from sluicegate.mitmcompat import upstream_connect

logger = logging.getLogger("sluicegate.routing")


@dataclasses.dataclass(frozen=True)
class Destination:
    """Where a request goes, as the proxy will connect to and verify it (normalized names)."""

    scheme: str
    host: str
    port: int
    tls_names: tuple[str, ...]  # names the upstream certificate may be verified against

    @classmethod
    def of(cls, flow: http.HTTPFlow) -> Destination:
        request = flow.request
        host = normalize_host(request.host)
        names: set[str] = set()
        if request.scheme == "https" and is_base_url_flow(flow):
            # A base-URL request's host was set from its route: mitmproxy opens a connection
            # of its own to it, verified against that host (the client's SNI, if it spoke TLS
            # to the listener, names the gateway and is not sent upstream).
            names = {host}
        elif request.scheme == "https":
            # mitmproxy verifies the upstream against the server's SNI, else the client's SNI,
            # else the host; requiring all of them to fit the route covers every case.
            sni = (flow.server_conn.sni, flow.client_conn.sni)
            names = {host, *(normalize_host(name) for name in sni if name)}
        return cls(request.scheme, host, request.port, tuple(sorted(names)))

    def names(self) -> Iterable[str]:
        yield self.host
        yield from self.tls_names


def host_matches(pattern: str, host: str) -> bool:
    """`host` (normalized) fits a route host: equal, or a subdomain for `*.suffix`."""
    pattern = pattern.lower()
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return normalize_host(pattern) == host


def serves(route: Route, destination: Destination) -> bool:
    """Whether `route` is for this scheme, port and (every name of the) host."""
    return (
        route.scheme == destination.scheme
        and route.port == destination.port
        and all(host_matches(route.host, name) for name in destination.names())
    )


def admits(route: Route, caller: flowstate.Caller) -> bool:
    """A route without groups admits any authenticated caller, else one sharing a group."""
    return not route.groups or not set(route.groups).isdisjoint(caller.groups)


class RouteTable:
    """The configured routes, most specific first: exact host, longer host, longer prefix."""

    def __init__(self, routes: Sequence[Route]) -> None:
        def specificity(route: Route) -> tuple[bool, int, int]:
            return (not route.host.startswith("*."), len(route.host), len(route.path_prefix))

        self._routes = sorted(routes, key=specificity, reverse=True)
        # Prefixes in the form paths are matched in (config validation made them canonical).
        self._prefixes = {id(r): canonical_path(r.path_prefix).decoded for r in self._routes}

    def match(self, destination: Destination, path: str) -> Route | None:
        """The most specific route serving `destination` whose prefix covers `path` (decoded,
        as `canonical_path` reads it)."""
        for route in self._routes:
            if serves(route, destination) and prefix_covers(self._prefixes[id(route)], path):
                return route
        return None

    def for_endpoint(self, host: str, port: int) -> list[Route]:
        """Routes that could serve a tunnel to `host:port` (any scheme, path or SNI)."""
        host = normalize_host(host)
        return [r for r in self._routes if r.port == port and host_matches(r.host, host)]


def read_path(flow: http.HTTPFlow) -> RequestPath:
    """The flow's canonical path, read once and kept; the request's path is rewritten to it.
    Raises `GatewayRefusal` (400 `invalid_path`) for a path upstreams may read differently."""
    st = flowstate.state(flow)
    kept = st.path
    if kept is not None:
        return kept
    try:
        path = canonical_path(flow.request.path)
    except AmbiguousPath as e:
        raise guard.GatewayRefusal(400, e.code, e.message) from None
    if path.target != flow.request.path:
        flow.request.path = path.target
    st.path = path
    return path


def judged_path(flow: http.HTTPFlow) -> str:
    """The decoded path routes and policy rules match (see `read_path`)."""
    return read_path(flow).decoded


def path_still_judged(flow: http.HTTPFlow) -> bool:
    """Whether the path about to leave is the one that was judged (query aside), or a rewrite
    of it (a redacted path segment) that is still canonical and inside the flow's route."""
    kept = flowstate.state(flow).path
    if kept is None:
        return False
    leaving = flow.request.path.partition("?")[0]
    if leaving == kept.wire:
        return True
    try:
        again = canonical_path(leaving)
    except AmbiguousPath:
        return False
    route = chosen_route(flow)
    return again.wire == leaving and (
        route is None or prefix_covers(canonical_path(route.path_prefix).decoded, again.decoded)
    )


def chosen_route(flow: http.HTTPFlow) -> Route | None:
    """The route Routing chose for `flow` (None: unrouted passthrough, or not routed)."""
    return flowstate.state(flow).route_config


class Routing(GatewayAddon):
    """Third in the chain, after CallerAuth: which route, if any, a flow may use."""

    def __init__(self) -> None:
        self._table = RouteTable(())
        self._passthrough = False
        self._egress = EgressGuard()

    def load(self, loader: Any) -> None:
        super().load(loader)
        upstream_connect.install()

    def apply(self, config: config_mod.Config) -> None:
        self._table = RouteTable(config.routes)
        self._passthrough = config.unrouted == "passthrough"
        named = [(r.host, r.port) for r in config.routes if not r.host.startswith("*.")]
        allowances = [InternalAllowance.parse(entry) for entry in config.allow_internal]
        self._egress = EgressGuard(named, allowances)
        upstream_connect.check = self._egress.refusal_for_address
        if self._passthrough:
            logger.warning(
                "sluicegate: unrouted: passthrough: authenticated callers reach ANY public "
                "destination without a route (no credential injected; redacted, policed and "
                "recorded). Internal addresses (loopback, private, link-local, CGNAT, cloud "
                "metadata) are refused unless a route names them or allow_internal lists them "
                "(%s).",
                ", ".join(config.allow_internal) or "none listed",
            )

    @guard.fail_closed("gateway_error")
    def http_connect(self, flow: http.HTTPFlow) -> None:
        """Deny tunnels to destinations no route serves before any TLS is set up."""
        host, port = flow.request.host, flow.request.port
        if self._passthrough:
            self._refuse_internal_name(host, port)
            return
        routes = self._table.for_endpoint(host, port)
        if not routes:
            raise _egress_denied(host, port)
        self._refuse_internal_name(host, port)
        caller = flowstate.state(flow).caller  # known when the tunnel is proxy-authenticated
        if caller is not None and not any(admits(route, caller) for route in routes):
            raise _group_not_allowed(routes[0].name)

    @guard.fail_closed("gateway_error")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        st = flowstate.state(flow)
        if st.caller is None:  # CallerAuth runs first and refuses; never route a stranger
            raise LookupError("flow reached Routing without a verified caller")
        path = read_path(flow).decoded
        route = self._table.match(Destination.of(flow), path)
        if route is None and not self._passthrough:
            raise _egress_denied(flow.request.host, flow.request.port)
        st.route = route.name if route is not None else None
        flowstate.record(flow, "route", st.route)
        if route is not None and not admits(route, st.caller):
            raise _group_not_allowed(route.name)
        self._refuse_internal_name(flow.request.host, flow.request.port)
        st.route_config = route

    @guard.fail_closed("gateway_error")
    async def request(self, flow: http.HTTPFlow) -> None:
        """A destination the configuration does not name: refuse it if its name resolves to an
        internal address (a clear 403 before any connection; the connection itself is checked
        again on the address it really goes to, see mitmcompat/upstream_connect.py)."""
        host, port = flow.request.host, flow.request.port
        if self._egress.named(host, port) or literal_address(host) is not None:
            return  # named, or a literal address `requestheaders` already judged
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return  # mitmproxy's own connection attempt reports it (502)
        for *_, sockaddr in infos:
            kind = self._egress.refusal_for_address(host, port, str(sockaddr[0]))
            if kind is not None:
                raise _egress_internal(host, port, kind)

    def _refuse_internal_name(self, host: str, port: int) -> None:
        kind = self._egress.refusal_for_name(host, port)
        if kind is not None:
            raise _egress_internal(host, port, kind)
        if unusual_ipv4(host):  # policy `hosts` rules would not recognise the address
            raise guard.GatewayRefusal(
                400,
                "invalid_host",
                "The destination is an IPv4 address in an unusual spelling (such as 2130706433 "
                "or 0x7f.1); write it as four decimal numbers.",
            )


def _egress_internal(host: str, port: int, kind: str) -> guard.GatewayRefusal:
    return guard.GatewayRefusal(
        403,
        "egress_internal",
        f"{host}:{port} is an internal address ({kind}) that no route names; "
        f"the gateway does not forward there. {NO_PROXY_HINT.format(host=host)}",
    )


NO_PROXY_HINT = (
    "If the agent should reach this local service directly, add {host} to NO_PROXY and no_proxy "
    "(`agent-env --no-proxy`); to reach it through the gateway, add a route naming it."
)
_LOCAL_SUFFIXES = (".local", ".localhost", ".internal", ".lan", ".home.arpa", ".svc", ".corp")


def _egress_denied(host: str, port: int) -> guard.GatewayRefusal:
    message = f"{host}:{port} is not an allowed destination of this gateway."
    name = host.rstrip(".").lower()
    if "." not in name or name.endswith(_LOCAL_SUFFIXES) or ".svc." in name:
        message += " " + NO_PROXY_HINT.format(host=host)  # looks like a local service
    return guard.GatewayRefusal(403, "egress_denied", message)


def _group_not_allowed(route: str) -> guard.GatewayRefusal:
    return guard.GatewayRefusal(
        403, "group_not_allowed", f"Route {route!r} is not open to the caller's groups."
    )
