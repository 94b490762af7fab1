"""What Redis-backed rate limiting adds per request, against the memory backend.

    python -m bench state [--rounds 7] [--calls 2000] [--requests 300] [--clients 8]

Two measurements, each in interleaved rounds (memory, redis, memory, redis, ...) so machine noise
hits both alike; medians of the rounds are reported.

1. Engine: `SharedState.acquire` with one limit, sequentially (latency per call) and 8 at a time
   on one event loop (calls per second), against a local redis-server.
2. Gateway: the full chain (auth, a route with an injected key, redaction, recording) with one
   rate limit matching every request (a budget never exhausted), `state.backend: memory` vs
   `redis`, plus the same gateway without any rate limit: one client's p50 latency over one
   keep-alive connection, and requests per second with `--clients` connections.

Everything runs on loopback; Redis is a real redis-server started here (localhost TCP, no TLS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "addons"), str(ROOT), str(ROOT / "scripts")]

import yaml  # noqa: E402

from bench import lib as benchlib  # noqa: E402
from sluicegate.policy.ratelimit import Limit  # noqa: E402
from sluicegate.state import MemoryState, RedisSettings, RedisState, SharedState  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

BODY = json.dumps(
    {"model": "gpt-test", "messages": [{"role": "user", "content": "hello there"}]}
).encode()
BIG_BUDGET = {"id": "bench-budget", "requests": 1_000_000_000, "window_seconds": 60}


# -- engine ------------------------------------------------------------------------------------


async def engine_round(state: SharedState, calls: int) -> tuple[float, float, float]:
    """(µs per sequential call, concurrent calls per second, µs of this process's CPU per
    sequential call)."""
    limit = Limit("bench", 1_000_000_000, 60)
    hits = [(limit, "caller")]
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        assert await state.acquire(hits) is None
    sequential = (time.perf_counter() - start) / calls * 1e6
    cpu_per_call = (time.process_time() - cpu) / calls * 1e6

    async def worker(n: int) -> None:
        for _ in range(n):
            assert await state.acquire(hits) is None

    start = time.perf_counter()
    await asyncio.gather(*(worker(calls // 8) for _ in range(8)))
    concurrent = (calls // 8 * 8) / (time.perf_counter() - start)
    return sequential, concurrent, cpu_per_call


async def engine(
    server: RedisServer, rounds: int, calls: int
) -> dict[str, list[tuple[float, float, float]]]:
    memory = MemoryState("bench")
    redis = RedisState(RedisSettings(url=server.url, key_prefix="bench:engine:"), "bench")
    await redis.start()
    results: dict[str, list[tuple[float, float, float]]] = {"memory": [], "redis": []}
    try:
        await engine_round(redis, 200)  # warm: connection pool, script cache
        for _ in range(rounds):
            results["memory"].append(await engine_round(memory, calls))
            results["redis"].append(await engine_round(redis, calls))
    finally:
        await redis.close()
    return results


# -- gateway -----------------------------------------------------------------------------------


def gateway_config(
    env: benchlib.BenchEnv, upstream_port: int, state: dict[str, Any] | None
) -> Path:
    policy = {"rate_limits": [{**BIG_BUDGET, "per": "caller"}]} if state is not None else None
    path = env.config(upstream_port, policy=policy)
    if state is not None:
        cfg = yaml.safe_load(path.read_text())
        cfg["state"] = state
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


async def latency(target: benchlib.Target, requests: int) -> float:
    conn = await benchlib.Conn.open(target)
    times = []
    try:
        for _ in range(requests):
            start = time.perf_counter()
            response = await conn.request(benchlib.post(target, "/v1/chat/completions", BODY))
            times.append(time.perf_counter() - start)
            if response.status != 200:
                raise SystemExit(f"status {response.status}: {response.body[:200]!r}")
    finally:
        await conn.close()
    return benchlib.median(times[len(times) // 10 :]) * 1e3


async def throughput(target: benchlib.Target, requests: int, clients: int) -> float:
    async def client(n: int) -> None:
        conn = await benchlib.Conn.open(target)
        try:
            for _ in range(n):
                response = await conn.request(benchlib.post(target, "/v1/chat/completions", BODY))
                if response.status != 200:
                    raise SystemExit(f"status {response.status}")
        finally:
            await conn.close()

    per = requests // clients
    start = time.perf_counter()
    await asyncio.gather(*(client(per) for _ in range(clients)))
    return per * clients / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000, help="engine calls per round")
    parser.add_argument("--requests", type=int, default=300, help="gateway requests per round")
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-state-") as tmp:
        work = Path(tmp)
        server = RedisServer(work / "redis", appendonly=False).start()
        procs: list[benchlib.Process] = []
        try:
            print("== engine: SharedState.acquire, one limit")
            results = asyncio.run(engine(server, args.rounds, args.calls))

            def med(kind: str, i: int) -> float:
                return benchlib.median([r[i] for r in results[kind]])

            for kind in ("memory", "redis"):
                print(
                    f"  {kind:<6} {med(kind, 0):8.1f} µs per call ({med(kind, 2):.1f} µs client "
                    f"CPU), {med(kind, 1):9.0f} calls/s with 8 concurrent"
                )
            print(f"  redis adds {med('redis', 0) - med('memory', 0):.1f} µs per call")

            env = benchlib.BenchEnv(work)
            upstream = env.start_upstream()
            procs.append(upstream)
            redis_state = {
                "backend": "redis",
                "url": {"env": "BENCH_REDIS_URL"},
                "key_prefix": "bench:gw:",
            }
            os.environ["BENCH_REDIS_URL"] = server.url
            gateways = {
                "no limit": env.start_gateway(gateway_config(env, upstream.port, None), "plain"),
                "memory": env.start_gateway(
                    gateway_config(env, upstream.port, {"backend": "memory"}), "memory"
                ),
                "redis": env.start_gateway(
                    gateway_config(env, upstream.port, redis_state), "redis"
                ),
            }
            procs += gateways.values()
            tls = env.client_tls()
            targets = {
                name: benchlib.Target(p.port, "127.0.0.1", upstream.port, env.token, tls)
                for name, p in gateways.items()
            }
            for target in targets.values():  # warm up
                asyncio.run(latency(target, 50))
            lat: dict[str, list[float]] = {n: [] for n in targets}
            thr: dict[str, list[float]] = {n: [] for n in targets}
            cpu: dict[str, float] = {n: 0.0 for n in targets}
            redis_cpu = 0.0
            for _ in range(args.rounds):
                for name, target in targets.items():
                    before = gateways[name].cpu()
                    redis_before = benchlib.cpu_seconds(server.proc.pid)  # type: ignore[union-attr]
                    lat[name].append(asyncio.run(latency(target, args.requests)))
                    thr[name].append(
                        asyncio.run(throughput(target, args.requests * 2, args.clients))
                    )
                    cpu[name] += gateways[name].cpu() - before
                    if name == "redis":
                        redis_cpu += (
                            benchlib.cpu_seconds(server.proc.pid)  # type: ignore[union-attr]
                            - redis_before
                        )
            print(
                f"== gateway: full chain, one rate limit on every request "
                f"({args.rounds} interleaved rounds, medians)"
            )
            total = args.rounds * args.requests * 3
            for name in targets:
                print(
                    f"  {name:<8} p50 {benchlib.median(lat[name]):6.2f} ms   "
                    f"{benchlib.median(thr[name]):6.0f} req/s ({args.clients} clients)   "
                    f"proxy CPU {cpu[name] / total * 1e3:.2f} ms/request"
                )
            added = benchlib.median(lat["redis"]) - benchlib.median(lat["memory"])
            ratio = benchlib.median(thr["redis"]) / benchlib.median(thr["memory"])
            print(f"  redis vs memory: {added:+.2f} ms p50, throughput ratio {ratio:.2f}")
            extra_cpu = (cpu["redis"] - cpu["memory"]) / total * 1e3
            print(
                f"  redis vs memory: proxy CPU {extra_cpu:+.2f} ms/request "
                f"(ratio {cpu['redis'] / cpu['memory']:.2f}); redis-server CPU "
                f"{redis_cpu / total * 1e6:.0f} µs/request"
            )
            limit_cost = benchlib.median(lat["memory"]) - benchlib.median(lat["no limit"])
            print(f"  memory rate limit vs none: {limit_cost:+.2f} ms p50")
        finally:
            for proc in procs:
                proc.stop()
            server.stop()


if __name__ == "__main__":
    main()
