"""mitmproxy's event dispatch, with and without sluicegate.mitmcompat.dispatch_cache, in process.

    python -m bench dispatch [--events 20000] [--rounds 5]

Builds the addon chain mitmdump runs (its default addons, as `mitmdump` adds them) and fires the
events one small proxied HTTPS request fires, with no-op flows, through mitmproxy's own
`AddonManager.trigger_event` and through the cached one, interleaved; prints µs per request of
dispatch alone (no TLS, no sockets, no hook doing real work).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from mitmproxy import hooks, options
from mitmproxy.proxy.layers.http import (
    HttpRequestHeadersHook,
    HttpRequestHook,
    HttpResponseHeadersHook,
    HttpResponseHook,
)
from mitmproxy.test import tflow
from mitmproxy.tools.dump import DumpMaster

from bench.lib import median
from sluicegate.mitmcompat import dispatch_cache

# Per small request on a keep-alive tunnel: the four HTTP hooks, each followed by the `update`
# mitmproxy fires for a changed flow (handle_lifecycle); connection hooks are amortised.
PER_REQUEST = 4
_CHAIN: list[Any] = []


def events(flow: Any) -> list[hooks.Hook]:
    return [
        HttpRequestHeadersHook(flow),
        HttpRequestHook(flow),
        HttpResponseHeadersHook(flow),
        HttpResponseHook(flow),
    ]


async def measure(trigger: Any, manager: Any, count: int) -> float:
    """µs per request: `count` requests' events through `trigger`."""
    flow = tflow.tflow(resp=True)
    fired = events(flow)
    update = hooks.UpdateHook([flow])
    start = time.process_time()
    for _ in range(count):
        for event in fired:
            await trigger(manager, event)
            await trigger(manager, update)
    return (time.process_time() - start) / count * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    dispatch_cache.install()
    original = dispatch_cache.ORIGINALS["trigger_event"]
    cached = dispatch_cache._cached_trigger_event(original)

    async def run() -> dict[str, list[float]]:
        master = DumpMaster(options.Options(), with_termlog=False, with_dumper=True)
        master.options.update(flow_detail=0)  # as the benchmarks run mitmdump
        manager = master.addons
        _CHAIN[:] = manager.chain
        results: dict[str, list[float]] = {"mitmproxy": [], "cached": []}
        for i in range(args.rounds):
            order = list(results) if i % 2 == 0 else list(reversed(results))
            for name in order:
                trigger = original if name == "mitmproxy" else cached
                results[name].append(await measure(trigger, manager, args.requests))
        return results

    results = asyncio.run(run())
    chain = len(_CHAIN)
    base, fast = median(results["mitmproxy"]), median(results["cached"])
    print(
        f"dispatch of one small request's events over mitmdump's {chain} addons: "
        f"mitmproxy {base:.0f} µs, cached {fast:.0f} µs ({base / fast:.1f}x less)"
    )
    return 0
