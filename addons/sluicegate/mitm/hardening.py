"""Refuse mitmproxy settings that would let traffic bypass the gateway.

A gateway is only as strong as the proxy it runs in. Some mitmproxy options route bodies around
the addon hooks (`stream_large_bodies`), skip upstream verification (`ssl_insecure`), write
unredacted flows (`save_stream_file`, mitmproxy's own `-w`, which saves before our redaction runs),
print headers and bodies to the log (`flow_detail` > 1) or tunnel hosts uninspected
(`ignore_hosts`...). With any of them set, the gateway refuses all traffic and says why; at
start-up mitmdump exits non-zero.

It also makes mitmproxy connect upstream lazily, so no upstream connection is made for a caller
that fails authentication, turns its raw TCP relay off (`rawtcp`: non-HTTP bytes in a tunnel are
an HTTP error, never relayed), reads HTTP/1.1 trailers and pipes only WebSocket upgrades
(`http1_protocol`), refuses header values with CR, LF or NUL (400 `invalid_header`: HTTP/2
peers can send them, and an HTTP/1.1 upstream would read a second request), keeps the raw
bytes mitmproxy quotes in protocol errors and crash tracebacks out of error pages, logs and
recordings (`protocol_errors`), and caps request and response heads
(`gateway.max_header_bytes`, `max_headers`: 431 `headers_too_large`), also while mitmproxy is
still reading them (`head_limits`).

Every answer names its request: allowed ones get `x-sluicegate-request-id` here (the gateway's
own answers have it from `guard.answer`), and mitmproxy's own error answers (upstream unreachable,
TLS verify failed, malformed upstream answers) become the gateway's JSON errors
(`error_answers`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Set
from pathlib import Path
from typing import Any

from mitmproxy import ctx, http

from sluicegate.mitm import flowstate, guard
from sluicegate.mitm.base import GatewayAddon, _report_once
from sluicegate.mitmcompat import (
    dispatch_cache,
    error_answers,
    head_limits,
    http1_protocol,
    protocol_errors,
    websocket_closing,
)

logger = logging.getLogger("sluicegate.hardening")

BODY_LIMIT_MARGIN = 64 * 1024
NOT_A_BASE_URL = (
    "This is sluicegate, an HTTPS proxy: requests go through it, not to it. Keep the SDK's own "
    "base URL (e.g. https://api.openai.com/v1) and set HTTPS_PROXY=http://agent:<token>@"
    "<this gateway> and its CA (`python -m sluicegate agent-env` prints the environment). "
    "Agents that cannot use a proxy use the gateway's base-URL listener instead, where it has "
    "one (`base_url` in its config; `agent-env --base-url`)."
)
_SELF_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"})


def unsafe_options() -> list[str]:
    """Why the current mitmproxy options are unsafe for a gateway (empty when they are fine)."""
    o = ctx.options
    problems = []
    if o.stream_large_bodies:
        problems.append(
            "stream_large_bodies streams bodies past redaction; remove it "
            "(sluicegate streams text/event-stream itself, redacted)"
        )
    if o.ssl_insecure:
        problems.append(
            "ssl_insecure disables upstream certificate verification, so credentials could reach "
            "an impostor; trust a private CA with ssl_verify_upstream_trusted_ca instead"
        )
    if o.save_stream_file:
        problems.append(
            "save_stream_file (-w) saves flows before redaction; use sluicegate's recorder"
        )
    if o.flow_detail > 1:
        problems.append("flow_detail above 1 prints headers and bodies to the log; use 0 or 1")
    for name in ("ignore_hosts", "allow_hosts", "tcp_hosts", "udp_hosts"):
        if getattr(o, name, None):
            problems.append(f"{name} passes traffic through uninspected; remove it")
    if o.proxyauth:
        problems.append("proxyauth conflicts with sluicegate's token authentication; remove it")
    unknown = sorted(k for k in o.deferred if k.startswith("sluicegate"))
    for name in unknown:
        problems.append(f"unknown option {name!r} (did you mean 'sluicegate_config'?)")
    return problems


class ProxyHardening(GatewayAddon):
    """First addon of the chain: the proxy itself must be configured safely."""

    name = "sluicegate"

    def load(self, loader: Any) -> None:
        super().load(loader)
        protocol_errors.install()
        head_limits.install()
        dispatch_cache.install()
        http1_protocol.install()
        error_answers.install()
        websocket_closing.install()
        error_answers.responder = error_answer

    def configure(self, updated: Set[str]) -> None:
        super().configure(updated)
        # One update for all of them: each update runs every addon's `configure` again.
        updates: dict[str, Any] = {}
        if ctx.options.connection_strategy != "lazy":
            # Eager connects upstream on CONNECT, before an inner token could be checked.
            updates["connection_strategy"] = "lazy"
        if ctx.options.rawtcp:
            # Raw TCP (non-HTTP bytes in a tunnel, a 101 that is no WebSocket) is relayed by
            # mitmproxy past every HTTP hook; without it such bytes are an HTTP error.
            updates["rawtcp"] = False
        if self.config is not None and not ctx.options.body_size_limit:
            # Without it mitmproxy reads a whole oversized body before any refusal is sent, so an
            # unauthenticated client could make the gateway buffer gigabytes. Slightly above our own
            # cap (which applies to decoded bodies and answers with JSON) so ours decides first.
            updates["body_size_limit"] = str(self.config.gateway.max_body_bytes + BODY_LIMIT_MARGIN)
        if updates:
            ctx.options.update(**updates)
            if "connection_strategy" in updates:
                logger.info("sluicegate: set connection_strategy=lazy (connect upstream on demand)")
            if "rawtcp" in updates:
                logger.info("sluicegate: set rawtcp=false (no raw TCP relay)")
            if "body_size_limit" in updates:
                logger.info(
                    "sluicegate: set body_size_limit=%s (gateway.max_body_bytes + margin)",
                    updates["body_size_limit"],
                )
        if self.config is not None:
            head_limits.limit = self.config.gateway.max_header_bytes
            head_limits.timeout = self.config.gateway.header_timeout_seconds
        problems = unsafe_options()
        for problem in problems:
            _report_once("options", f"unsafe mitmproxy option: {problem}")
        if problems:
            self.config = None

    def running(self) -> None:
        # Unknown --set names are only known once every addon has declared its options.
        self.configure(set())
        self._check_ca()

    def _check_ca(self) -> None:
        """A confdir without a CA makes mitmproxy mint a new one at start-up, which no agent
        trusts: a mistyped `--set confdir` looks like a working gateway whose every TLS
        handshake fails. Refused in production, a warning in development."""
        confdir = Path(ctx.options.confdir).expanduser()
        if not ca_minted_at_startup(confdir):
            return
        message = (
            f"confdir {confdir} had no CA, so mitmproxy has just created a new one that no agent "
            "trusts (a mistyped --set confdir?). Point confdir at the gateway's CA, or create "
            "one on purpose first: python -m sluicegate ca init --confdir DIR"
        )
        if self.config is not None and self.config.gateway.environment == "production":
            _report_once("ca", message)
            self.config = None
        else:
            logger.warning("sluicegate: %s", message)

    @guard.fail_closed("gateway_error")
    def http_connect(self, flow: http.HTTPFlow) -> None:
        """Refuse heads over the limits (and everything while unconfigured: the guard)."""
        self._check_head(flow)

    @guard.fail_closed("gateway_error")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Refuse heads over the limits before any addon parses them; explain a request sent to
        the gateway itself (its address used as an SDK's base URL)."""
        self._check_head(flow)
        if addressed_to_gateway(flow):
            raise guard.GatewayRefusal(400, "not_a_proxy_request", NOT_A_BASE_URL)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Allowed answers carry the request id too (the agent quotes it to an operator)."""
        if flow.response is not None:
            flow.response.headers[guard.REQUEST_ID_HEADER] = flowstate.state(flow).request_id

    def response(self, flow: http.HTTPFlow) -> None:
        # Answers set without a head from upstream (a later addon's own) keep theirs; this only
        # fills in what is missing.
        if flow.response is not None and guard.REQUEST_ID_HEADER not in flow.response.headers:
            flow.response.headers[guard.REQUEST_ID_HEADER] = flowstate.state(flow).request_id

    def _check_head(self, flow: http.HTTPFlow) -> None:
        assert self.config is not None  # the guard refuses while unconfigured
        limits = self.config.gateway
        request = flow.request
        fields = request.headers.fields
        size = len(request.method) + len(request.authority) + len(request.path) + 16
        size += sum(len(name) + len(value) + 4 for name, value in fields)
        if size > limits.max_header_bytes or len(fields) > limits.max_headers:
            raise guard.GatewayRefusal(431, head_limits.CODE, head_limits.MESSAGE)
        if not _TOKEN.fullmatch(request.method) or _CONTROL.search(request.authority):
            raise _invalid_head("request line")
        if any(c in name or c in value for name, value in fields for c in _FORBIDDEN):
            raise _invalid_head("request header")


# An HTTP/2 peer can put these in a value; written to an HTTP/1.1 upstream they end the field
# (a second, smuggled request). mitmproxy's own checks do not look at values.
_FORBIDDEN = (b"\r", b"\n", b"\x00")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def _invalid_head(where: str) -> guard.GatewayRefusal:
    return guard.GatewayRefusal(
        400,
        "invalid_header",
        f"A {where} holds a line break, NUL or other control character, which an HTTP/1.1 "
        "upstream would read as the end of the field (request smuggling); it was not forwarded.",
    )


def error_answer(flow: http.HTTPFlow, status: int, message: str) -> http.Response | None:
    """The JSON error mitmproxy's own error answer becomes (see mitmcompat/error_answers)."""
    status, code, text = error_answers.classify(status, message)
    logger.info(
        "sluicegate: %s (%s) [request %s]: %s",
        code,
        status,
        flowstate.state(flow).request_id,
        message,
    )
    guard.answer(flow, status, code, text)
    return flow.response


def addressed_to_gateway(flow: http.HTTPFlow) -> bool:
    """A plain request (not in a CONNECT tunnel) for the address the gateway listens on: the
    gateway's URL was given to an SDK as its base URL instead of as its proxy."""
    if flow.client_conn.tls_established:
        return False
    sockname = flow.client_conn.sockname
    if not sockname or flow.request.port != sockname[1]:
        return False
    host = flow.request.host.strip("[]").lower()
    return host == str(sockname[0]).lower() or host in _SELF_NAMES or host == _HOSTNAME


_HOSTNAME = socket.gethostname().lower()


CA_FILE = "mitmproxy-ca.pem"


def process_started() -> float | None:
    """When this process started (Linux /proc), or None where that cannot be read. Measured on
    the boot-time clock /proc uses, so clock adjustments since boot do not shift it."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime: field 22 of stat, clock ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age


def ca_minted_at_startup(confdir: Path) -> bool:
    started = process_started()
    try:
        written = (confdir / CA_FILE).stat().st_mtime
    except OSError:
        return False
    # The start time is known to a clock tick (10 ms) and a CA written just before the process
    # started (a deployment script's `ca init`) must not count; mitmproxy itself mints its CA
    # only after its imports, a second or so after the start.
    return started is not None and written >= started + _MINT_MARGIN


_MINT_MARGIN = 0.2
