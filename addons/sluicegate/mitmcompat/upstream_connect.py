"""Upstream connections go only to addresses that were checked: resolve once, check, connect.

mitmproxy opens every upstream TCP connection with `asyncio.open_connection(host, port,
local_addr=...)` in `ConnectionHandler.open_connection` (mitmproxy/proxy/server.py), which
resolves the name and connects in one call; its `server_connect` hook runs before, with the name
only. A check in a hook (or anywhere before that call) resolves the name a second time, and a DNS
answer that changes between the two lookups (DNS rebinding: a public address for the check,
127.0.0.1 for the connection) would walk past it.

So this patch replaces the `asyncio` that module sees by a stand-in whose `open_connection`
resolves the name itself (`loop.getaddrinfo`, the same resolver asyncio uses), asks `check`
about every address, refuses the connection if any is refused, and otherwise connects to the
checked addresses (numeric, so asyncio resolves nothing more), in the resolver's order. Everything
else on the stand-in is the real asyncio. A refusal is an `OSError` (mitmproxy's handler turns it
into the flow's error and a 502 for the agent; no byte reaches the address).

Routing installs it once per process and sets `check` from the config (`EgressGuard`); like the
other patches it stays installed when the script is unloaded. UDP connections (`mitmproxy_rs`)
are not covered: the gateway refuses UDP flows (ChainSentinel) and runs in regular proxy mode.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any, Final

from mitmproxy.proxy import server

from sluicegate import mitmcompat

logger = logging.getLogger("sluicegate.egress")

# (host, port, address) -> why connecting is refused, or None. None: no check (unconfigured).
Check = Callable[[str, int, str], str | None]
check: Check | None = None

REFUSED_PREFIX: Final = "sluicegate: egress refused"


class EgressRefused(PermissionError):
    """A connection the check refused. Its text is what mitmproxy shows as the flow's error."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        text = f"{REFUSED_PREFIX}: {host}:{port} resolves to an internal address ({reason})"
        super().__init__(errno.EACCES, text)
        self.reason = reason


async def open_connection(
    host: str, port: int, *, local_addr: Any = None, **kwargs: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """`asyncio.open_connection` that connects only to addresses `check` allowed."""
    current = check
    if current is None:
        return await asyncio.open_connection(host, port, local_addr=local_addr, **kwargs)
    infos = await _resolve(host, port)
    addresses: list[tuple[int, str]] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        reason = current(host, port, address)
        if reason is not None:
            logger.warning(
                "sluicegate: egress refused: %s:%d resolved to %s (%s)", host, port, address, reason
            )
            raise EgressRefused(host, port, reason)
        if (family, address) not in addresses:
            addresses.append((family, address))
    if not addresses:
        raise OSError(errno.EHOSTUNREACH, f"{host}:{port} did not resolve to any address")
    error: OSError | None = None
    for family, address in addresses:
        try:
            return await asyncio.open_connection(
                address, port, local_addr=local_addr, family=family, **kwargs
            )
        except OSError as e:
            error = e
    assert error is not None
    raise error


async def _resolve(host: str, port: int) -> list[tuple[Any, ...]]:
    try:  # a plain IP literal: nothing to resolve (asyncio skips the resolver for these too)
        ip = ipaddress.ip_address(host)
    except ValueError:
        loop = asyncio.get_running_loop()
        return await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]


class _PinnedAsyncio:
    """The `asyncio` mitmproxy's proxy server sees: the real one, but `open_connection`."""

    open_connection = staticmethod(open_connection)

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


def install() -> None:
    """Route mitmproxy's upstream connections through `open_connection` (idempotent)."""
    mitmcompat.require("upstream_connect")
    if not isinstance(server.asyncio, _PinnedAsyncio):
        server.asyncio = _PinnedAsyncio()  # type: ignore[assignment]
