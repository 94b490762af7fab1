"""A small caller's latency while another caller sends 8 MB bodies: redaction in worker
processes vs in the gateway process vs bare mitmdump.

    python -m bench offload [--rounds 5] [--seconds 6] [--mb 8] [--period 2] [--repeated]
                            [--smoke]

Three proxies on loopback, the same HTTPS upstream (bench/upstream.py): bare `mitmdump`; the
gateway with `redaction.worker_processes: 2` (the default: bodies over `process_bytes` are
redacted in worker processes); the gateway with `worker_processes: 0` (large bodies redacted on
a thread of the gateway process, which shares the interpreter lock with the event loop: what
"in-loop" costs the other callers). Full chain in both gateways (auth, injected credential,
default rule pack both ways, recording on unless `--no-recording`).

Per round and proxy: one caller sends small chat requests back to back on a keep-alive
connection for `--seconds` while a second caller sends chat requests of `--mb` MB on another
(prose and a few secrets; new text in every turn of every request, or with `--repeated` the
same turns but the first, as a resent conversation, which the memo of clean texts makes cheap),
one starting every `--period` seconds on every proxy (or when the previous one ends, if later);
then the small caller alone for a second (idle). Printed: the small caller's p50 / p99 / max
latency under load and idle, the large requests completed and their time, and the proxy's CPU
(its live redaction workers' included). Rounds alternate the proxies' order; medians of the
rounds.

Section `lag` measures the redaction paths without the proxies (less noise from the machine):
the worst delays of a 1 ms heartbeat on an event loop while that loop's process redacts one
large body in a worker process, on a thread, or does nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from mitmproxy import version

from bench.gateway import COUNTER, SMALL_BODY, Requests
from bench.lib import (
    ROOT,
    BenchEnv,
    Conn,
    Process,
    Target,
    cpu_seconds,
    median,
    percentile,
    post,
)

CHAT = "/v1/chat/completions"
PROSE = (
    "The build runs the unit tests first, then the integration suite against a local upstream; "
    "def handler(request):\n    return respond(request.path, status=200)\n"
    "Retries back off exponentially and the cache keeps the last good answer for a minute. "
)
SECRETS = (
    "ghp_" + "x1Y2z3A4b5C6d7E8f9G0h1I2j3K4l5M6n7O8",
    "AKIA" + "Q3EGRIYS6BUKJ4VRNDN7",
)
PROXIES = ("bare", "in-process", "processes")


def large_body(size: int, fresh: bool) -> bytes:
    """A chat request of ~`size` bytes: turns of prose, a secret every ~256 KB. With `fresh`
    every turn carries the request's number (a new document each time: nothing for the memo of
    clean texts); without, only the first turn does (a conversation resent with a new turn)."""
    turns: list[dict[str, str]] = []
    total = 0
    index = 0
    while total < size:
        text = PROSE * 40
        if index % 20 == 0:
            text += f" use {SECRETS[(index // 20) % len(SECRETS)]} next"
        if fresh or index == 0:
            text = f"{COUNTER.decode()} {text}"
        turns.append({"role": "user", "content": text})
        total += len(text) + 40
        index += 1
    return json.dumps({"model": "gpt-bench", "messages": turns}).encode()


class Numbered(Requests):
    """Every counter in the body replaced by the request's number."""

    def next(self) -> bytes:
        self.sent += 1
        return self.template.replace(COUNTER, b"%011d" % self.sent)


@dataclass
class Sample:
    loaded: list[float] = field(default_factory=list)  # small latencies under load (s)
    idle: list[float] = field(default_factory=list)
    large_done: int = 0
    large_seconds: list[float] = field(default_factory=list)
    cpu: float = 0.0  # proxy CPU (with its redaction workers) during the loaded window
    errors: int = 0


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its running children (live redaction workers)."""
    total = cpu_seconds(pid)
    for child in children(pid):
        try:
            total += cpu_seconds(child)
        except OSError:
            continue
    return total


async def measure(
    proxy: Process,
    target: Target,
    seconds: float,
    period: float,
    large: Requests,
    small: Requests,
) -> Sample:
    sample = Sample()
    quick = await Conn.open(target)
    big = await Conn.open(target)
    response = await quick.request(post(target, CHAT, small.next()))
    if response.status != 200:
        raise SystemExit(f"{proxy.name}: small request got {response.status}")
    stop = asyncio.Event()

    async def sender() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            next_at = start + period
            response = await big.request(post(target, CHAT, large.next()))
            if response.status != 200:
                sample.errors += 1
                print(f"  {proxy.name}: large request: HTTP {response.status}")
                return
            sample.large_seconds.append(time.perf_counter() - start)
            sample.large_done += 1
            # The same pace on every proxy: bare mitmdump would relay far more bodies in the
            # window otherwise, and its small caller would wait behind more relaying.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.perf_counter()))

    async def caller(into: list[float], until: float) -> None:
        while time.perf_counter() < until:
            start = time.perf_counter()
            response = await quick.request(post(target, CHAT, small.next()))
            if response.status != 200:
                sample.errors += 1
                return
            into.append(time.perf_counter() - start)

    cpu = tree_cpu(proxy.pid)
    task = asyncio.ensure_future(sender())
    await asyncio.sleep(0.05)  # the first large body is on its way
    await caller(sample.loaded, time.perf_counter() + seconds)
    stop.set()
    await task  # the large request in flight finishes
    sample.cpu = tree_cpu(proxy.pid) - cpu
    await caller(sample.idle, time.perf_counter() + 1.0)
    await quick.close()
    await big.close()
    return sample


async def lag_while(work: Awaitable[object]) -> tuple[float, list[float]]:
    """Seconds `work` took, and how late each 1 ms heartbeat on this event loop woke
    meanwhile (seconds)."""
    lags: list[float] = []
    done = False

    async def beat() -> None:
        while not done:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - start - 0.001)

    heartbeat = asyncio.ensure_future(beat())
    start = time.perf_counter()
    await work
    elapsed = time.perf_counter() - start
    done = True
    await heartbeat
    return elapsed, lags


def section_lag(rounds: int, size: int) -> None:
    """The gateway's redaction paths alone, in this process: an event loop with a 1 ms
    heartbeat while one large body is redacted by a worker process (`OffloadPool`), on a thread
    (`worker_processes: 0`), or nothing happens (the machine's own noise)."""
    import sluicegate.redaction  # noqa: F401  (registers the stream check)
    from sluicegate.redaction.bodies import BodyPolicy, redact_body
    from sluicegate.redaction.offload import OffloadPool, WorkerSetup
    from sluicegate.redaction.redactor import Redactor
    from sluicegate.redaction.rules import Direction, load_rule_pack

    pack = load_rule_pack([ROOT / "rules"])
    redactor = Redactor(pack, Direction.REQUEST)
    bodies = Numbered(large_body(size, fresh=True))
    policy = BodyPolicy()
    results: dict[str, list[tuple[float, list[float]]]] = {
        "worker process": [],
        "thread": [],
        "idle": [],
    }

    async def run() -> None:
        pool = OffloadPool(WorkerSetup(pack, True, True), workers=1, budget_seconds=120.0)
        await pool.ready()
        try:
            for index in range(rounds):
                order = list(results) if index % 2 == 0 else list(reversed(results))
                for name in order:
                    body = bodies.next()
                    if name == "worker process":
                        work: Awaitable[object] = pool.redact(
                            body, "application/json", Direction.REQUEST, policy
                        )
                    elif name == "thread":
                        work = asyncio.to_thread(
                            redact_body, body, "application/json", redactor, policy
                        )
                    else:
                        work = asyncio.sleep(0.5)
                    results[name].append(await lag_while(work))
        finally:
            pool.stop()

    asyncio.run(run())
    print(
        f"\n## event-loop lag while one {size / 1e6:.1f} MB body is redacted (1 ms heartbeat, "
        f"this process; {rounds} rounds, medians)"
    )
    print("| path | body s | lag p50 ms | lag p99 ms | lag max ms |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        print(
            f"| {name} | {median([e for e, _ in runs]):.2f} "
            f"| {ms(median([percentile(lags, 0.5) for _, lags in runs]))} "
            f"| {ms(median([percentile(lags, 0.99) for _, lags in runs]))} "
            f"| {ms(median([max(lags, default=float('nan')) for _, lags in runs]))} |"
        )


def gateway_config(env: BenchEnv, upstream_port: int, workers: int, recording: bool) -> Path:
    path = env.config(upstream_port, recording=recording)
    cfg = yaml.safe_load(path.read_text())
    cfg["redaction"]["worker_processes"] = workers
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def ms(value: float) -> str:
    return f"{value * 1000:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per proxy (interleaved)")
    parser.add_argument("--seconds", type=float, default=6.0, help="loaded window per round")
    parser.add_argument("--mb", type=float, default=8.0, help="size of the large bodies (MB)")
    parser.add_argument(
        "--period", type=float, default=2.0, help="a large body starts every PERIOD seconds"
    )
    parser.add_argument(
        "--repeated",
        action="store_true",
        help="large bodies repeat but for their first turn (a resent conversation)",
    )
    parser.add_argument(
        "--no-recording", action="store_true", help="gateways without a recording section"
    )
    parser.add_argument(
        "--only", default="proxies,lag", help="sections: proxies (through mitmdump), lag"
    )
    parser.add_argument("--smoke", action="store_true", help="1 round, 256 KB, 1 s: shape only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.seconds, args.mb, args.period = 1, 1.0, 0.25, 0.25
    size = int(args.mb * 1024 * 1024)
    sections = {name.strip() for name in args.only.split(",")}
    if "lag" in sections:
        section_lag(args.rounds, size)
    if "proxies" not in sections:
        return

    work = Path(tempfile.mkdtemp(prefix="sluicegate-bench-offload-"))
    env = BenchEnv(work)
    started: list[Process] = []
    try:
        upstream = env.start_upstream()
        started.append(upstream)
        proxies = {"bare": env.start_bare()}
        started.append(proxies["bare"])
        for name, workers in (("in-process", 0), ("processes", 2)):
            config = gateway_config(env, upstream.port, workers, not args.no_recording)
            proxies[name] = env.start_gateway(config, name)
            started.append(proxies[name])
        tls = env.client_tls()
        large_template = large_body(size, fresh=not args.repeated)
        print(
            f"small caller vs a caller sending {len(large_template) / 1e6:.1f} MB chat bodies "
            f"({'repeated' if args.repeated else 'new text in every turn'}) "
            f"(mitmproxy {version.VERSION}, {os.cpu_count()} CPUs, loopback); "
            f"one every {args.period:g} s; {args.rounds} rounds x {args.seconds:g} s, interleaved; "
            "medians of rounds"
        )
        time.sleep(3.0)  # the workers finish starting (they compile the rule pack)
        samples: dict[str, list[Sample]] = {name: [] for name in PROXIES}
        small = Requests(SMALL_BODY)
        large = Numbered(large_template)
        for index in range(args.rounds):
            order = PROXIES if index % 2 == 0 else tuple(reversed(PROXIES))
            for name in order:
                proxy = proxies[name]
                token = None if name == "bare" else env.token
                target = Target(proxy.port, "127.0.0.1", upstream.port, token, tls)
                samples[name].append(
                    asyncio.run(measure(proxy, target, args.seconds, args.period, large, small))
                )
        print()
        print(
            "| proxy | small p50 ms | small p99 ms | small max ms | idle p99 ms "
            "| large bodies done | large body s | proxy CPU s |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name in PROXIES:
            rows = samples[name]
            print(
                f"| {name} "
                f"| {ms(median([percentile(s.loaded, 0.5) for s in rows]))} "
                f"| {ms(median([percentile(s.loaded, 0.99) for s in rows]))} "
                f"| {ms(median([max(s.loaded, default=float('nan')) for s in rows]))} "
                f"| {ms(median([percentile(s.idle, 0.99) for s in rows]))} "
                f"| {median([float(s.large_done) for s in rows]):.0f} "
                f"| {median([median(s.large_seconds) for s in rows]):.2f} "
                f"| {median([s.cpu for s in rows]):.2f} |"
            )
        errors = sum(s.errors for rows in samples.values() for s in rows)
        if errors:
            print(f"\n{errors} request(s) failed")
        for name in ("in-process", "processes"):
            bad = [line for line in proxies[name].lines if "error" in line.lower()]
            if bad:
                print(f"{name} logged {len(bad)} error line(s), e.g.: {bad[0].strip()}")
        print(f"\nsmall requests sent: {small.sent}")
        for name in PROXIES:
            pids = [proxies[name].pid, *children(proxies[name].pid)]
            sizes = [rss(pid) for pid in pids]
            workers = ", ".join(f"{size / 2**20:.0f}" for size in sizes[1:]) or "none"
            print(f"RSS MiB, {name}: proxy {sizes[0] / 2**20:.0f}; workers {workers}")
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
