"""DemoUpstream addon: the dev gateway also serves the demo upstream (`sluicegate/demo/`).

Loaded only by `scripts/dev.sh run` (`-s addons/demo.py --set sluicegate_demo=certs/demo`),
never by the gateway chain. It listens where the config's `demo-*` routes point (loopback
addresses only), with the certificate in the `sluicegate_demo` directory, whose CA the dev
gateway trusts through `ssl_verify_upstream_trusted_ca`. Everything else about those flows
(authentication, routing, redaction, policy, recording) is the ordinary chain's.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

from mitmproxy import ctx

from sluicegate.demo.upstream import DemoUpstream
from sluicegate.mitm.base import OPTION, OPTION_HELP, current_config

logger = logging.getLogger("sluicegate.demo")

DEMO_OPTION = "sluicegate_demo"
ROUTE_PREFIX = "demo"
CERT, KEY = "upstream-cert.pem", "upstream-key.pem"


def demo_endpoints(routes: Any) -> list[tuple[str, int]]:
    """(host, port) of every `demo*` route on a loopback address, each once."""
    found: list[tuple[str, int]] = []
    for route in routes:
        if not route.name.startswith(ROUTE_PREFIX):
            continue
        try:
            loopback = ipaddress.ip_address(route.host).is_loopback
        except ValueError:
            loopback = False
        if loopback and (route.host, route.port) not in found:
            found.append((route.host, route.port))
    return found


class DemoUpstreamAddon:
    name = "sluicegate-demo-upstream"

    def __init__(self) -> None:
        self.servers: list[DemoUpstream] = []

    def load(self, loader: Any) -> None:
        loader.add_option(OPTION, str, "", OPTION_HELP)
        loader.add_option(
            DEMO_OPTION, str, "", "Directory of the demo upstream's certificate (dev only)."
        )

    async def running(self) -> None:
        directory = ctx.options.sluicegate_demo
        config = current_config()
        if not directory or config is None:
            return
        endpoints = demo_endpoints(config.routes)
        if not endpoints:
            logger.info("sluicegate: demo: no demo-* route on a loopback address; no demo upstream")
            return
        certs = Path(directory)
        for host, port in endpoints:
            server = DemoUpstream(host, port, certs / CERT, certs / KEY)
            try:
                await server.start()
            except OSError as e:
                logger.error(
                    "sluicegate: demo upstream cannot listen on %s:%s (%s)",
                    host,
                    port,
                    e.strerror or type(e).__name__,
                )
                continue
            self.servers.append(server)
            logger.info("sluicegate: demo upstream listening at https://%s:%s", host, port)

    def done(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()
