"""The whole gateway against bare mitmdump, same machine, same run: throughput, latency, SSE,
body size and rule count.

    python -m bench gateway [--only throughput,latency,sse,bodies,rules] [--rounds 5]
                                    [--seconds 4] [--quick] [--pin]

Everything is on loopback: an HTTPS upstream (bench/upstream.py, asyncio, own process),
a bare `mitmdump` (no script; the same confdir/CA, trusting the same upstream CA; flow_detail=0
like the gateway) and the gateway (`-s addons/gateway.py`: token auth on CONNECT, a route with an
injected credential, the default rule pack on requests and responses, recording on). Clients
speak HTTPS through CONNECT with keep-alive (bench/lib.py: raw asyncio, cheap per
request). Bare and gateway rounds alternate so machine noise hits both; medians are printed.

Sections:
  throughput  small JSON chat requests, 10 and 50 concurrent clients, closed loop: requests/s,
              p50/p99 latency, and proxy CPU per request (the figure least affected by noise);
  latency     one client, one request at a time: the latency the gateway adds to a request;
  sse         50 concurrent streams of 2,000 unpaced events: time to first token, total time
              (bare runs with `--set stream_large_bodies=1` so it streams instead of buffering);
  bodies      one client, request and response bodies of 1 KB .. 10 MB (both directions);
  rules       synthetic prefix-anchored rule packs of 10 .. 500 rules (and the default pack).

`--pin` puts the proxies on CPU 0 and the client and upstream on CPU 1 (less interference on a
2-core machine, but other load on the machine then hits the proxies unevenly).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from mitmproxy import version

from bench.lib import (
    ROOT,
    BenchEnv,
    Conn,
    Process,
    Response,
    Target,
    get,
    median,
    percentile,
    post,
)

# Replaced by a per-request counter: each request asks something new (the system prompt and the
# model repeat, as they do between an agent's turns), and the upstream's answers differ too.
COUNTER = b"@@COUNTER@@"
SMALL_BODY = json.dumps(
    {
        "model": "gpt-bench",
        "messages": [
            {"role": "system", "content": "You are a careful coding assistant."},
            {"role": "user", "content": "Question @@COUNTER@@: what does a forward proxy do?"},
        ],
        "temperature": 0.2,
    }
).encode()
CHAT = "/v1/chat/completions"
PROSE = (
    "The build runs the unit tests first, then the integration suite against a local upstream; "
    "def handler(request):\n    return respond(request.path, status=200)\n"
    "Retries back off exponentially and the cache keeps the last good answer for a minute. "
)
FIRST_TOKEN = re.compile(rb'"content": ?" ?[A-Za-z]')
SECTIONS = ("throughput", "latency", "sse", "bodies", "rules")


def chat_body(size: int) -> bytes:
    """A chat request whose user message (a counter, then prose) makes the body ~`size` bytes."""
    text = COUNTER.decode() + " " + (PROSE * (size // len(PROSE) + 1))[: max(0, size - 120)]
    return json.dumps(
        {"model": "gpt-bench", "messages": [{"role": "user", "content": text}]}
    ).encode()


class Requests:
    """The request bytes to send, numbered: each one carries a new counter value."""

    def __init__(self, template: bytes) -> None:
        self.template = template
        self.sent = 0

    def next(self) -> bytes:
        self.sent += 1
        return self.template.replace(COUNTER, b"%011d" % self.sent, 1)


@dataclass
class Round:
    """One measured round on one proxy."""

    requests: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    proxy_cpu: float = 0.0
    client_cpu: float = 0.0
    upstream_cpu: float = 0.0
    refused: dict[str, int] = field(default_factory=dict)  # "503 <code>" -> answers

    @property
    def rps(self) -> float:
        """Answered requests per second (refusals, counted in `refused`, are not answers)."""
        return self.requests / self.seconds if self.seconds else 0.0

    def refused_total(self) -> int:
        return sum(self.refused.values())

    @property
    def cpu_us_per_request(self) -> float:
        return self.proxy_cpu / self.requests * 1e6 if self.requests else float("nan")


class Bench:
    def __init__(self, env: BenchEnv, upstream: Process, args: argparse.Namespace) -> None:
        self.env = env
        self.upstream = upstream
        self.args = args
        self.tls = env.client_tls()

    def target(self, proxy: Process, token: bool = True) -> Target:
        return Target(
            proxy.port,
            "127.0.0.1",
            self.upstream.port,
            self.env.token if token else None,
            self.tls,
        )

    async def closed_loop(
        self, proxy: Process, clients: int, seconds: float, requests: Requests
    ) -> Round:
        """`clients` keep-alive connections sending requests back to back for `seconds`."""
        target = self.target(proxy)
        conns = await asyncio.gather(*(Conn.open(target) for _ in range(clients)))
        result = Round()
        for conn in conns:  # warm: TLS to the upstream, the first request on each tunnel
            await _ok(conn.request(requests.next()), result.refused)
        result.refused.clear()
        deadline = 0.0

        async def worker(conn: Conn) -> None:
            while time.perf_counter() < deadline:
                raw = requests.next()
                start = time.perf_counter()
                if await _ok(conn.request(raw), result.refused):
                    result.latencies.append(time.perf_counter() - start)

        cpu = (proxy.cpu(), time.process_time(), self.upstream.cpu())
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(*(worker(c) for c in conns))
        result.seconds = time.perf_counter() - start
        result.requests = len(result.latencies)
        result.proxy_cpu = proxy.cpu() - cpu[0]
        result.client_cpu = time.process_time() - cpu[1]
        result.upstream_cpu = self.upstream.cpu() - cpu[2]
        for conn in conns:
            await conn.close()
        return result

    async def serial(self, proxy: Process, requests: Requests, count: int) -> Round:
        """One connection, `count` requests one after the other."""
        conn = await Conn.open(self.target(proxy))
        result = Round()
        await _ok(conn.request(requests.next()), result.refused)
        result.refused.clear()
        cpu = proxy.cpu()
        start = time.perf_counter()
        for _ in range(count):
            raw = requests.next()
            t0 = time.perf_counter()
            if await _ok(conn.request(raw), result.refused):
                result.latencies.append(time.perf_counter() - t0)
        result.seconds = time.perf_counter() - start
        result.requests = len(result.latencies)
        result.proxy_cpu = proxy.cpu() - cpu
        await conn.close()
        return result

    async def first_tokens(self, proxy: Process, count: int) -> Round:
        """One keep-alive connection, `count` short streams one after the other: the time to
        each one's first content event."""
        target = self.target(proxy)
        conn = await Conn.open(target)
        raw = get(target, "/sse?n=20")
        await conn.stream(raw, FIRST_TOKEN)
        result = Round()
        for _ in range(count):
            first, _, _ = await conn.stream(raw, FIRST_TOKEN)
            result.latencies.append(first)
        result.requests = count
        await conn.close()
        return result

    async def streams(self, proxy: Process, count: int, events: int) -> list[tuple[float, float]]:
        """`count` concurrent SSE streams of `events` events: (first token, total) seconds."""
        target = self.target(proxy)
        conns = await asyncio.gather(*(Conn.open(target) for _ in range(count)))
        for conn in conns:
            await conn.stream(get(target, "/sse?n=3"), FIRST_TOKEN)
        raw = get(target, f"/sse?n={events}")
        results = await asyncio.gather(*(c.stream(raw, FIRST_TOKEN) for c in conns))
        for conn in conns:
            await conn.close()
        return [(first, total) for first, total, _ in results]


async def _ok(pending: Awaitable[Response], refused: dict[str, int] | None = None) -> bool:
    """Whether the answer is a 200. A 503 (the gateway refusing in time: a redaction budget,
    recording unavailable, an overloaded machine) is counted in `refused` by its error code and
    the benchmark goes on; any other answer is a broken setup and stops it."""
    response = await pending
    if response.status == 200:
        return True
    if response.status == 503 and refused is not None:
        key = f"503 {error_code(response.body)}"
        refused[key] = refused.get(key, 0) + 1
        return False
    raise SystemExit(f"unexpected status {response.status}: {response.body[:300]!r}")


def error_code(body: bytes) -> str:
    """The gateway's stable error code in a JSON error answer, or "?"."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "?"
    return code if isinstance(code, str) else "?"


def merge_refused(rounds: Iterable[Round]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rounds:
        for key, count in r.refused.items():
            out[key] = out.get(key, 0) + count
    return out


def interleave(
    names: Iterable[str], rounds: int, measure: Callable[[str], Round]
) -> dict[str, list[Round]]:
    out: dict[str, list[Round]] = {name: [] for name in names}
    for i in range(rounds):
        order = list(out) if i % 2 == 0 else list(reversed(out))
        for name in order:
            out[name].append(measure(name))
    return out


def ratio_of_medians(values: dict[str, list[float]]) -> float:
    return median(values["gateway"]) / median(values["bare"])


# -- sections -----------------------------------------------------------------------------------


def section_throughput(bench: Bench, proxies: dict[str, Process]) -> None:
    args = bench.args
    print("\n## throughput: small JSON chat request over HTTPS/CONNECT, keep-alive, closed loop")
    print(
        f"{'clients':>7} {'proxy':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'CPU µs/req':>10} {'client CPU':>10} {'upstr CPU':>9}"
    )
    requests = Requests(post(bench.target(proxies["bare"]), CHAT, SMALL_BODY))
    for clients in (10, 50):
        runs = interleave(
            proxies,
            args.rounds,
            lambda n, c=clients: asyncio.run(
                bench.closed_loop(proxies[n], c, args.seconds, requests)
            ),
        )
        summary = {}
        for name, rounds in runs.items():
            rps = median([r.rps for r in rounds])
            p50 = median([percentile(r.latencies, 0.5) * 1e3 for r in rounds])
            p99 = median([percentile(r.latencies, 0.99) * 1e3 for r in rounds])
            cpu = median([r.cpu_us_per_request for r in rounds])
            client = median([r.client_cpu / r.seconds for r in rounds])
            up = median([r.upstream_cpu / r.seconds for r in rounds])
            summary[name] = (rps, p50, p99, cpu)
            print(
                f"{clients:>7} {name:>8} {rps:8.0f} {p50:8.2f} {p99:8.2f} {cpu:10.0f} "
                f"{client:9.0%} {up:9.0%}"
            )
        (brps, bp50, bp99, bcpu), (grps, gp50, gp99, gcpu) = summary["bare"], summary["gateway"]
        pair_ratios = [g.rps / b.rps for b, g in zip(runs["bare"], runs["gateway"], strict=True)]
        print(
            f"{clients:>7} {'ratio':>8} {grps / brps:8.2f} {gp50 - bp50:+8.2f} {gp99 - bp99:+8.2f} "
            f"{gcpu / bcpu:9.2f}x   (req/s ratio per round pair: "
            f"{', '.join(f'{r:.2f}' for r in pair_ratios)}; target >= 0.75)"
        )


def section_latency(bench: Bench, proxies: dict[str, Process]) -> None:
    args = bench.args
    count = 100 if args.quick else 300
    print(f"\n## latency: one client, {count} small JSON requests one at a time, per round")
    requests = Requests(post(bench.target(proxies["bare"]), CHAT, SMALL_BODY))
    runs = interleave(
        proxies, args.rounds, lambda n: asyncio.run(bench.serial(proxies[n], requests, count))
    )
    print(f"{'proxy':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'CPU µs/req':>10}")
    rows = {}
    for name, rounds in runs.items():
        p50 = median([percentile(r.latencies, 0.5) * 1e3 for r in rounds])
        p90 = median([percentile(r.latencies, 0.9) * 1e3 for r in rounds])
        p99 = median([percentile(r.latencies, 0.99) * 1e3 for r in rounds])
        cpu = median([r.cpu_us_per_request for r in rounds])
        rows[name] = (p50, p90, p99, cpu)
        print(f"{name:>8} {p50:8.2f} {p90:8.2f} {p99:8.2f} {cpu:10.0f}")
    b, g = rows["bare"], rows["gateway"]
    print(
        f"{'added':>8} {g[0] - b[0]:+8.2f} {g[1] - b[1]:+8.2f} {g[2] - b[2]:+8.2f} "
        f"{g[3] - b[3]:+10.0f}   (target: added p50 <= 2 ms)"
    )


def section_sse(bench: Bench, env: BenchEnv, gateway: Process) -> None:
    args = bench.args
    streams, events = (10, 500) if args.quick else (50, 2000)
    print(
        f"\n## SSE: {streams} concurrent streams of {events} unpaced events "
        "(bare = mitmdump --set stream_large_bodies=1)"
    )
    bare = env.start_bare("bare-stream", stream=True)
    try:
        proxies = {"bare": bare, "gateway": gateway}
        alone = interleave(
            proxies, args.rounds, lambda n: asyncio.run(bench.first_tokens(proxies[n], 20))
        )
        results: dict[str, list[tuple[float, float, float]]] = {n: [] for n in proxies}
        for i in range(max(3, args.rounds // 2)):
            for name in proxies if i % 2 == 0 else reversed(list(proxies)):
                proxy = proxies[name]
                cpu = proxy.cpu()
                runs = asyncio.run(bench.streams(proxy, streams, events))
                firsts = [f for f, _ in runs]
                results[name].append((median(firsts), max(t for _, t in runs), proxy.cpu() - cpu))
    finally:
        bare.stop()
    print(f"{'proxy':>8} {'first token p50 ms':>19} {'all streams done s':>19} {'proxy CPU s':>12}")
    rows = {}
    for name, values in results.items():
        rows[name] = tuple(median([v[i] for v in values]) for i in range(3))
        first, total, cpu = rows[name]
        print(f"{name:>8} {first * 1e3:19.1f} {total:19.2f} {cpu:12.2f}")
    b, g = rows["bare"], rows["gateway"]
    print(
        f"{'ratio':>8} {g[0] / b[0]:18.2f}x {g[1] / b[1]:18.2f}x {g[2] / b[2]:11.2f}x   "
        f"(first token added {(g[0] - b[0]) * 1e3:+.1f} ms; µs CPU per event: bare "
        f"{b[2] / (streams * events) * 1e6:.0f}, gateway {g[2] / (streams * events) * 1e6:.0f})"
    )
    first = {
        n: median([percentile(r.latencies, 0.5) for r in runs]) * 1e3 for n, runs in alone.items()
    }
    fb, fg = first["bare"], first["gateway"]
    print(
        f"one stream alone (no other load), first token p50: bare {fb:.2f} ms, "
        f"gateway {fg:.2f} ms, added {fg - fb:+.2f} ms"
    )


def section_bodies(bench: Bench, proxies: dict[str, Process]) -> None:
    args = bench.args
    sizes = [1_000, 10_000, 100_000, 1_000_000, 10_000_000]
    if args.quick:
        sizes = sizes[:4]
    print("\n## body size: one client; request body N bytes and response body N bytes")
    print(
        f"{'N':>10} {'bare ms':>9} {'gw ms':>9} {'added ms':>9} {'ratio':>6} "
        f"{'added µs/KB':>11} {'gw CPU ms':>10}"
    )
    for size in sizes:
        requests = Requests(
            post(bench.target(proxies["bare"]), f"{CHAT}?size={size}", chat_body(size))
        )
        count = max(3, min(60, int(2_000_000 / size)))
        runs = interleave(
            proxies,
            max(3, args.rounds // 2 * 2 + 1),
            lambda n, r=requests, c=count: asyncio.run(bench.serial(proxies[n], r, c)),
        )
        b = median([percentile(r.latencies, 0.5) for r in runs["bare"]]) * 1e3
        g = median([percentile(r.latencies, 0.5) for r in runs["gateway"]]) * 1e3
        cpu = median([r.cpu_us_per_request for r in runs["gateway"]]) / 1e3
        per_kb = (g - b) * 1e3 / (2 * size / 1000)
        print(f"{size:>10} {b:9.2f} {g:9.2f} {g - b:9.2f} {g / b:6.2f} {per_kb:11.1f} {cpu:10.2f}")


def synthetic_rules(directory: Path, count: int) -> Path:
    """`count` prefix-anchored rules (`sgb<i>_` + 32 base62 characters), one file."""
    directory.mkdir(parents=True, exist_ok=True)
    rules = []
    for i in range(count):
        prefix = f"sgb{i:04d}_"
        rules.append(
            {
                "id": f"synthetic-{i:04d}",
                "description": "Synthetic benchmark token.",
                "pattern": prefix + "[A-Za-z0-9]{32}",
                "keywords": [prefix],
                "profiles": ["default"],
                "examples": {"positive": [prefix + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6"]},
            }
        )
    path = directory / f"synthetic-{count}.yaml"
    path.write_text(yaml.safe_dump({"rules": rules}, sort_keys=False))
    return path


def section_rules(bench: Bench, env: BenchEnv, bare: Process) -> None:
    args = bench.args
    counts = [10, 50, 100, 250, 500]
    print(
        "\n## rule count: synthetic prefix-anchored packs (and the default pack); one client, "
        "median latency"
    )
    print(
        f"{'rules':>8} {'small: bare':>12} {'gw ms':>7} {'added':>7} "
        f"{'100 KB: bare':>13} {'gw ms':>7} {'added':>7} {'gw start s':>11}"
    )
    packs: list[tuple[str, list[Path]]] = [("default", [ROOT / "rules"])]
    packs += [(str(n), [synthetic_rules(env.work / "synthetic", n)]) for n in counts]
    small = Requests(post(bench.target(bare), CHAT, SMALL_BODY))
    big = Requests(post(bench.target(bare), f"{CHAT}?size=100000", chat_body(100_000)))
    counts = (150, 20) if args.quick else (300, 40)
    for label, rules in packs:
        config = env.config(bench.upstream.port, rules=rules)
        started = time.perf_counter()
        gateway = env.start_gateway(config, f"gateway-{label}")
        startup = time.perf_counter() - started
        try:
            pair = {"bare": bare, "gateway": gateway}
            row = []
            for requests, count in zip((small, big), counts, strict=True):
                runs = interleave(
                    pair,
                    3,
                    lambda n, r=requests, c=count, p=pair: asyncio.run(bench.serial(p[n], r, c)),
                )
                b = median([percentile(r.latencies, 0.5) for r in runs["bare"]]) * 1e3
                g = median([percentile(r.latencies, 0.5) for r in runs["gateway"]]) * 1e3
                row += [b, g, g - b]
        finally:
            gateway.stop()
        print(
            f"{label:>8} {row[0]:12.2f} {row[1]:7.2f} {row[2]:+7.2f} "
            f"{row[3]:13.2f} {row[4]:7.2f} {row[5]:+7.2f} {startup:11.1f}"
        )


# -- main ---------------------------------------------------------------------------------------


def pin(process: Process, cpu: int) -> None:
    os.sched_setaffinity(process.pid, {cpu})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per proxy (interleaved)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of a throughput round")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller runs")
    parser.add_argument("--pin", action="store_true", help="proxies on CPU 0, the rest on CPU 1")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (recordings)")
    parser.add_argument(
        "--gateway-script",
        type=Path,
        default=None,
        help="another gateway.py to measure (e.g. an exported older version), same config",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = min(args.rounds, 3), min(args.seconds, 2.0)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")

    work = Path(tempfile.mkdtemp(prefix="sluicegate-bench-"))
    env = BenchEnv(work, args.gateway_script)
    started: list[Process] = []
    try:
        upstream = env.start_upstream()
        started.append(upstream)
        bare = env.start_bare()
        started.append(bare)
        gateway = env.start_gateway(env.config(upstream.port))
        started.append(gateway)
        if args.pin:
            os.sched_setaffinity(0, {1})
            pin(upstream, 1)
            pin(bare, 0)
            pin(gateway, 0)
        bench = Bench(env, upstream, args)
        proxies = {"bare": bare, "gateway": gateway}
        print(
            f"bare mitmdump vs sluicegate gateway (mitmproxy {version.VERSION}), loopback, "
            f"{os.cpu_count()} CPUs{', pinned' if args.pin else ''}; {args.rounds} rounds, "
            "interleaved; medians"
        )
        for name in sections:
            if name == "throughput":
                section_throughput(bench, proxies)
            elif name == "latency":
                section_latency(bench, proxies)
            elif name == "sse":
                section_sse(bench, env, gateway)
            elif name == "bodies":
                section_bodies(bench, proxies)
            elif name == "rules":
                section_rules(bench, env, bare)
        errors = [line for line in gateway.lines if "error" in line.lower()]
        if errors:
            print(f"\ngateway logged {len(errors)} error line(s), e.g.: {errors[0].strip()}")
    finally:
        for process in reversed(started):
            process.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
