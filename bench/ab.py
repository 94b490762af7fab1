"""This checkout's gateway against another checkout's (e.g. main), and bare mitmdump, same run.

    python -m bench ab --against /work/main [--rounds 7] [--seconds 3] [--clients 10]

Three proxies side by side: bare mitmdump (unpatched), the gateway of `--against` (its own
`addons/gateway.py` and package) and this checkout's gateway, with the same config (token auth,
a route with an injected key, the default rule pack both ways, recording on). Small JSON
requests over HTTPS/CONNECT keep-alive, closed loop, rounds interleaved (order reversed every
other round); medians of requests/s and of proxy CPU per request, each as a ratio to bare. What
a change bought, measured beside what it changed, on the same (possibly shared) machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from pathlib import Path

from bench.gateway import CHAT, SMALL_BODY, Bench, Requests
from bench.lib import (
    GATEWAY_SCRIPT,
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
    parser.add_argument("--against", type=Path, required=True, help="another checkout's root")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args(argv)
    other = args.against.resolve() / "addons" / "gateway.py"
    if not other.exists():
        parser.error(f"{other} does not exist")
    work = Path(tempfile.mkdtemp(prefix="sluicegate-bench-ab-"))
    env = BenchEnv(work)
    started: list[Process] = []
    load = os.getloadavg()[0]
    try:
        upstream = env.start_upstream()
        started.append(upstream)

        def gateway(name: str, script: Path) -> Process:
            config = env.config(upstream.port)
            argv = [*env.common_args(), "-s", str(script), "--set", f"sluicegate_config={config}"]
            return start_mitmdump(name, argv, work, {UPSTREAM_KEY_ENV: UPSTREAM_KEY})

        proxies = {"bare": env.start_bare()}
        started.append(proxies["bare"])
        proxies["against"] = gateway("gateway-against", other)
        started.append(proxies["against"])
        proxies["this"] = gateway("gateway-this", GATEWAY_SCRIPT)
        started.append(proxies["this"])
        bench = Bench(env, upstream, argparse.Namespace(quick=False))
        requests = Requests(post(bench.target(proxies["bare"]), CHAT, SMALL_BODY))
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in proxies}
        for name in proxies:  # warm-up, not counted
            asyncio.run(bench.closed_loop(proxies[name], args.clients, 1.0, requests))
        for i in range(args.rounds):
            for name in list(proxies) if i % 2 == 0 else list(reversed(proxies)):
                done = asyncio.run(
                    bench.closed_loop(proxies[name], args.clients, args.seconds, requests)
                )
                results[name].append((done.rps, done.cpu_us_per_request))
        rps = {n: median([r for r, _ in v]) for n, v in results.items()}
        cpu = {n: median([c for _, c in v]) for n, v in results.items()}
        print(
            f"{args.clients} clients, {args.rounds} interleaved rounds of {args.seconds:g} s, "
            f"medians; load {load:.1f} at start, {os.getloadavg()[0]:.1f} at end"
        )
        labels = {"bare": "bare mitmdump", "against": f"gateway {args.against}", "this": "gateway"}
        for name in proxies:
            print(
                f"{labels[name]:>24}: {rps[name]:7.0f} req/s ({rps[name] / rps['bare']:.2f}x bare),"
                f" CPU {cpu[name]:6.0f} µs/request ({cpu[name] / cpu['bare']:.2f}x bare)"
            )
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0
