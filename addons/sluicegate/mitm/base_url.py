"""BaseUrl: the gateway as an API's base URL, for agents that cannot use a proxy.

Node before 24 (its fetch, the openai and Anthropic Node SDKs) ignores HTTPS_PROXY and would go
straight to the API. Such agents are given the gateway itself as their base URL:

    OPENAI_BASE_URL=http://127.0.0.1:8081/openai/v1     OPENAI_API_KEY=<caller token>

`base_url` in the config adds a listener in mitmproxy's reverse mode (a `mode` entry of its own
beside the proxy's, on mitmproxy 11 and 12 alike). Its reverse target is a name that never
resolves (`.invalid`): every request on it is mapped here, in `requestheaders`, before Routing
sees it, and a request this addon did not map could not go anywhere. The mapping
(`egress/base_url.py`): the whole path is read canonically first (`..`, encoded traversal: 400
`invalid_path`), its prefix names a route (none: 404 `base_url_unknown_prefix`), the request
then goes to the route's scheme, host and port with the rest of the path. From there on it is an
ordinary flow of the chain: CallerAuth verifies the token the SDK sends as its API key (401
`missing_token` without one; `base_url.token_sources`), Routing chooses the route for that
upstream and path as for a proxied request, and policy, redaction, credential injection and
recording are the proxy's.

A request written for a proxy (`GET http://host/...`, absolute form) is refused 405
`base_url_proxy_request`: the listener is not a proxy. So is a `CONNECT`, which mitmproxy
refuses itself on a reverse-mode listener before any hook can answer it (it then runs the
requestheaders and error hooks, but ignores a response they set): its 400 error answer is
turned into the same 405 by mitmcompat/error_answers.py, with a request id of its own.

A port already in use stops the gateway at start-up with exit code 3 and says which setting to
change.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Set
from typing import Any, Final

from mitmproxy import ctx, exceptions, http
from mitmproxy.net.http import url
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from sluicegate import config as config_mod
from sluicegate.egress.base_url import PrefixTable, UnknownPrefix
from sluicegate.egress.paths import AmbiguousPath
from sluicegate.mitm import flowstate, guard
from sluicegate.mitm.base import GatewayAddon
from sluicegate.mitmcompat import error_answers

logger = logging.getLogger("sluicegate.base_url")

# The reverse target of the listener: a reserved name that never resolves (RFC 2606), so nothing
# reaches it even if a request escaped the mapping. It also tells the listener's flows apart.
TARGET: Final = "http://sluicegate-base-url.invalid:9"
EXIT_PORT_IN_USE: Final = 3


def mode_spec(host: str, port: int) -> str:
    """The mitmproxy `mode` entry of the base-URL listener."""
    return f"reverse:{TARGET}@{host}:{port}"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def is_ours(spec: str) -> bool:
    try:
        mode = ProxyMode.parse(spec)
    except ValueError:
        return False
    return isinstance(mode, ReverseMode) and mode.data == TARGET


def is_base_url_flow(flow: http.HTTPFlow) -> bool:
    """Whether `flow` came in on the base-URL listener."""
    mode = flow.client_conn.proxy_mode
    return isinstance(mode, ReverseMode) and mode.data == TARGET


def port_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` fails because something listens there (as mitmproxy binds:
    SO_REUSEADDR, so a port in TIME_WAIT is free)."""
    if port == 0:
        return False
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False  # mitmproxy reports a name it cannot bind itself
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


class BaseUrl(GatewayAddon):
    """After CallerAuth, before Routing: map base-URL requests to their route's upstream."""

    name = "sluicegate-base-url"

    def __init__(self) -> None:
        self._table: PrefixTable | None = None
        self._routes: dict[str, config_mod.Route] = {}
        self._section: config_mod.BaseUrlSection | None = None
        self._running = False
        self._updating = False
        self._bring_up: asyncio.Task[None] | None = None

    def apply(self, config: config_mod.Config) -> None:
        section = config.base_url
        self._section = section
        self._table = PrefixTable(section.prefixes) if section is not None else None
        self._routes = {route.name: route for route in config.routes}

    def configure(self, updated: Set[str]) -> None:
        super().configure(updated)
        if self.config is not None:
            self._listen()

    def running(self) -> None:
        # Sync: mitmproxy calls `running` synchronously when it reloads the script.
        self._running = True
        if self._section is None:
            return
        if _bound() is not None:
            self._announce()
            return
        # mitmproxy 12 may bring its listeners up while the script is still being configured,
        # from the `mode` it had then, and only follows later changes once it runs: ask it
        # again (nothing happens for listeners already up).
        self._bring_up = asyncio.get_running_loop().create_task(self._setup_servers())

    async def _setup_servers(self) -> None:
        proxyserver: Any = ctx.master.addons.get("proxyserver")
        await proxyserver.setup_servers()
        self._announce()

    def _announce(self) -> None:
        section = self._section
        if section is None:
            return
        where = _bound()
        if where is None:
            logger.error(
                "sluicegate: base_url: the listener on %s:%s did not start (see above)",
                section.listen_host,
                section.listen_port,
            )
            return
        routes = ", ".join(f"{p} -> {r}" for p, r in sorted(section.prefixes.items()))
        logger.info("sluicegate: base-URL listener at http://%s (%s)", where, routes)

    def _listen(self) -> None:
        """Make mitmproxy's listeners match the config: ours added, moved or removed."""
        if self._updating:
            return  # our own options update runs every addon's `configure` again
        section = self._section
        modes = list(ctx.options.mode)
        ours = [m for m in modes if is_ours(m)]
        wanted = [self._spec(section, ours)] if section is not None else []
        if ours == wanted:
            return
        if section is not None and port_in_use(section.listen_host, section.listen_port):
            self._cannot_listen(
                section,
                "address already in use (another gateway? mitmweb's web port is 8081 too)",
            )
            return
        self._updating = True
        try:
            ctx.options.update(mode=[m for m in modes if not is_ours(m)] + wanted)
        except exceptions.OptionsError as e:
            if section is None:  # removing a listener: mitmproxy refused the others' modes
                logger.error("sluicegate: base_url: cannot remove the listener: %s", e)
            else:
                self._cannot_listen(section, str(e))
        finally:
            self._updating = False

    def _spec(self, section: config_mod.BaseUrlSection, current: list[str]) -> str:
        """Our mode entry. Port 0 is resolved to a free port here: mitmproxy refuses two
        listeners on port 0 of one address (the proxy's own may be there too)."""
        if section.listen_port != 0:
            return mode_spec(section.listen_host, section.listen_port)
        for spec in current:  # keep the port already picked for this host
            mode = ProxyMode.parse(spec)
            if mode.listen_host("") == section.listen_host:
                return spec
        with socket.socket(_family(section.listen_host)) as probe:
            probe.bind((section.listen_host, 0))
            port = probe.getsockname()[1]
        return mode_spec(section.listen_host, port)

    def _cannot_listen(self, section: config_mod.BaseUrlSection, why: str) -> None:
        logger.error(
            "sluicegate: base_url: cannot listen on %s:%s: %s; set base_url.listen_port "
            "(or listen_host) to a free address",
            section.listen_host,
            section.listen_port,
            why,
        )
        if not self._running:
            # At start-up: stop here, with a code of its own (a running gateway keeps serving
            # its proxy, and mitmproxy logs its own failure to move the listener).
            raise SystemExit(EXIT_PORT_IN_USE)

    @guard.fail_closed("gateway_error")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not is_base_url_flow(flow):
            return
        table = self._table
        if table is None:
            raise guard.GatewayRefusal(
                404, "base_url_unknown_prefix", "Base-URL mode is not configured on this gateway."
            )
        request = flow.request
        if request.authority and not (request.is_http2 or request.is_http3):
            raise guard.GatewayRefusal(
                405, error_answers.BASE_URL_PROXY_REQUEST, error_answers.BASE_URL_PROXY_MESSAGE
            )
        try:
            mapped = table.map(request.path)
        except AmbiguousPath as e:
            raise guard.GatewayRefusal(400, e.code, e.message) from None
        except UnknownPrefix:
            raise guard.GatewayRefusal(
                404,
                "base_url_unknown_prefix",
                "No base-URL prefix of this gateway covers the path; known prefixes: "
                + ", ".join(table.prefixes),
            ) from None
        route = self._routes[mapped.route]  # config validation: every prefix names a route
        request.scheme = route.scheme
        request.host = route.host
        request.port = route.port
        request.path = mapped.target
        request.host_header = url.hostport(route.scheme, _bracketed(route.host), route.port)
        flowstate.record(flow, "base_url", mapped.prefix)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bound() -> str | None:
    """host:port the listener really listens on."""
    try:
        proxyserver: Any = ctx.master.addons.get("proxyserver")
        for instance in proxyserver.servers:
            if is_ours(instance.mode.full_spec) and instance.listen_addrs:
                host, port = instance.listen_addrs[0][:2]
                return f"{host}:{port}"
    except Exception:
        return None
    return None
