"""The gateway with and without mitmcompat.dispatch_cache, against bare mitmdump, same run.

    python -m bench cache_ab [--rounds 5] [--seconds 3] [--clients 10]

Three proxies side by side: bare mitmdump (unpatched), the gateway with
`SLUICEGATE_DISPATCH_CACHE=0` (mitmproxy's own dispatch) and the gateway as it runs (the cache
on). Small JSON requests over HTTPS/CONNECT keep-alive, closed loop, rounds interleaved (order
reversed every other round); medians of requests/s and of proxy CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from pathlib import Path

from bench.gateway import CHAT, SMALL_BODY, Bench, Requests
from bench.lib import (
    UPSTREAM_KEY,
    UPSTREAM_KEY_ENV,
    BenchEnv,
    Process,
    median,
    post,
    start_mitmdump,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sluicegate-bench-cache-"))
    env = BenchEnv(work)
    started: list[Process] = []
    try:
        upstream = env.start_upstream()
        started.append(upstream)

        def gateway(name: str, cache: str) -> Process:
            config = env.config(upstream.port)
            argv = [*env.common_args(), "-s", str(env.gateway_script)]
            argv += ["--set", f"sluicegate_config={config}"]
            extra = {UPSTREAM_KEY_ENV: UPSTREAM_KEY, "SLUICEGATE_DISPATCH_CACHE": cache}
            return start_mitmdump(name, argv, work, extra)

        proxies = {
            "bare": env.start_bare(),
            "gateway, no cache": gateway("gateway-nocache", "0"),
            "gateway": gateway("gateway", "1"),
        }
        started += proxies.values()
        bench = Bench(env, upstream, argparse.Namespace(quick=False))
        requests = Requests(post(bench.target(proxies["bare"]), CHAT, SMALL_BODY))
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in proxies}
        for i in range(args.rounds):
            for name in list(proxies) if i % 2 == 0 else list(reversed(proxies)):
                done = asyncio.run(
                    bench.closed_loop(proxies[name], args.clients, args.seconds, requests)
                )
                results[name].append((done.rps, done.cpu_us_per_request))
        rps = {n: median([r for r, _ in v]) for n, v in results.items()}
        cpu = {n: median([c for _, c in v]) for n, v in results.items()}
        print(f"{args.clients} clients, {args.rounds} interleaved rounds, medians")
        for name in proxies:
            print(
                f"{name:>18}: {rps[name]:7.0f} req/s ({rps[name] / rps['bare']:.2f}x bare), "
                f"CPU {cpu[name]:6.0f} µs/request ({cpu[name] / cpu['bare']:.2f}x bare)"
            )
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0
