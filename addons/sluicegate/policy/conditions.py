"""What a rule can match on: the flow context (caller, destination, method, path) and conditions."""

from __future__ import annotations

import dataclasses
import ipaddress

import regex

from sluicegate.policy.patterns import Pattern
from sluicegate.policy.views import BodyViews
from sluicegate.shapes.mcp import name_matches


@dataclasses.dataclass(frozen=True)
class FlowContext:
    """Everything except bodies that rules can match on. Plain values, no secrets."""

    subject: str | None
    issuer: str | None
    groups: frozenset[str]
    route: str | None
    host: str
    port: int
    method: str
    path: str  # decoded canonical path, no query (egress.paths.canonical_path)
    # One JSON-RPC message of an MCP (or any JSON-RPC) request body: its method, and the tool a
    # `tools/call` calls. A body of several messages is judged message by message.
    mcp_method: str | None = None
    mcp_tool: str | None = None

    @property
    def identity(self) -> str:
        """Rate limits and grants key on this: who, as verified (issuer + subject)."""
        if self.subject is None:
            return "anonymous"
        return f"{self.issuer or ''}|{self.subject}"

    @property
    def destination(self) -> str:
        """The route name, or host:port for unrouted destinations."""
        return f"route:{self.route}" if self.route else f"host:{self.host}:{self.port}"


def compile_path_rule(source: str) -> regex.Pattern[str]:
    """A `paths` entry: matched against the whole decoded path, case-insensitively (see
    `egress.paths`: upstreams that ignore case read `/v1/Admin` as `/v1/admin`)."""
    return regex.compile(source, regex.IGNORECASE)


# -- conditions and rules --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostPattern:
    """`api.example.com`, `*.example.com` (subdomains only), optionally with `:port`."""

    host: str
    port: int | None = None
    wildcard: bool = False

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        """Raises ValueError with a message fit for a config error."""
        host, port = text.strip().lower(), None
        if not host or any(c in host for c in "/@ ?#"):
            raise ValueError(_HOST_FORMAT)
        if host.startswith("["):
            inner, _, rest = host[1:].partition("]")
            host = inner
            if rest:
                if not rest.startswith(":"):
                    raise ValueError("expected `[ipv6]:port`")
                port = _port(rest[1:])
        elif host.count(":") == 1:
            host, port_text = host.split(":")
            port = _port(port_text)
        wildcard = host.startswith("*.")
        name = host[2:] if wildcard else host
        if not name or "*" in name:
            raise ValueError(_HOST_FORMAT)
        if ":" in name or text.strip().startswith("["):
            ipaddress.IPv6Address(name)  # raises ValueError
        return cls(host=name, port=port, wildcard=wildcard)

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        host = host.lower().rstrip(".")
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


_HOST_FORMAT = "must be a host name, `*.domain` or an IP address, optionally :port"


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError("port must be a number between 1 and 65535")
    return int(text)


@dataclasses.dataclass(frozen=True)
class Conditions:
    """What a rule matches. Empty conditions are ignored; all non-empty ones must hold.

    Within one condition any listed value may match (a caller in ANY of `groups`, a body with
    ANY of `body_patterns`). `paths` are regular expressions (`compile_path_rule`) matched against
    the WHOLE decoded path (without the query string), ignoring case. `mcp_methods` and
    `mcp_tools` are globs (case-sensitive, as MCP names are) over the context's JSON-RPC message;
    a flow without one matches neither.
    """

    hosts: tuple[HostPattern, ...] = ()
    routes: frozenset[str] = frozenset()
    methods: frozenset[str] = frozenset()
    paths: tuple[regex.Pattern[str], ...] = ()
    groups: frozenset[str] = frozenset()
    subjects: frozenset[str] = frozenset()
    body_patterns: tuple[Pattern, ...] = ()
    body_larger_than: int | None = None
    mcp_methods: tuple[str, ...] = ()  # globs over the JSON-RPC method
    mcp_tools: tuple[str, ...] = ()  # globs over the tool of a `tools/call`

    @property
    def uses_mcp(self) -> bool:
        return bool(self.mcp_methods or self.mcp_tools)

    @property
    def needs_body(self) -> bool:
        return bool(self.body_patterns) or self.body_larger_than is not None

    def context_matches(self, ctx: FlowContext, *, ignore_mcp: bool = False) -> bool:
        """Whether the context conditions hold (`ignore_mcp`: all but the MCP ones)."""
        if self.hosts and not any(h.matches(ctx.host, ctx.port) for h in self.hosts):
            return False
        if self.routes and ctx.route not in self.routes:
            return False
        if self.methods and ctx.method.upper() not in self.methods:
            return False
        if self.paths and not any(p.fullmatch(ctx.path) for p in self.paths):
            return False
        if self.groups and self.groups.isdisjoint(ctx.groups):
            return False
        if self.subjects and ctx.subject not in self.subjects:
            return False
        return ignore_mcp or self._mcp_matches(ctx)

    def _mcp_matches(self, ctx: FlowContext) -> bool:
        if self.mcp_methods and (
            ctx.mcp_method is None or not name_matches(ctx.mcp_method, self.mcp_methods)
        ):
            return False
        return not self.mcp_tools or (
            ctx.mcp_tool is not None and name_matches(ctx.mcp_tool, self.mcp_tools)
        )

    def body_matches(self, body: BodyViews, timeout: float | None) -> tuple[str, ...] | None:
        """Names of the patterns found (empty if the rule has none), or None: no match."""
        if self.body_larger_than is not None and body.size <= self.body_larger_than:
            return None
        if not self.body_patterns:
            return ()
        found = tuple(p.name for p in self.body_patterns if p.found_in(body, timeout))
        return found or None
