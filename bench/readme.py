"""The table README "Performance" quotes: the gateway against bare mitmdump, same run, same machine.

    python -m bench readme [--rounds 5] [--seconds 4] [--json FILE] [--readme README.md]
    python -m bench readme --smoke          # seconds; CI runs it (tests/e2e/test_bench_smoke.py)

Every proxy figure is measured on bare `mitmdump` (unpatched, no script) and on the gateway
(`-s addons/gateway.py`: token auth on CONNECT, a route with an injected key, the default rule
pack both ways, recording on) in the same run: rounds alternate between the two (bare first on
even rounds, gateway first on odd ones) and the medians of the rounds are compared, so machine
load hits both alike. Rows:

- throughput: small JSON chat requests over HTTPS/CONNECT keep-alive, 10 and 50 clients, closed
  loop (requests/s, and proxy CPU per request: the figure least affected by other load);
- latency: one client, one request at a time: added p50 / p99;
- SSE: one stream of 2,000 unpaced events (total time); 50 concurrent such streams (all done);
  a stream of 4 KiB deltas (MB/s). Bare runs with `stream_large_bodies=1` so it streams too;
- redaction engine (in this process, CPU time, no memo): MB/s on agent JSON payloads (chat
  requests with long messages and tool-call arguments) and on JSON documents of many small
  strings (API specs, tool schemas), per rule pack profile;
- loop stall: the worst latency of a small request sent on another connection while one caller
  sends adversarial bodies (large JSON of many small strings, keyword-dense text, one long
  string), minus that small request's median latency when the gateway is idle.

A 503 from the gateway (refused in time: a redaction budget, recording unavailable) is not a
benchmark failure: it is counted by its error code, left out of the figures and named in the row
(a refused SSE round is repeated); any other unexpected answer stops the run.

`--readme FILE` rewrites the table between the `<!-- bench readme -->` markers of FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import string
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import version

from bench.gateway import (
    CHAT,
    SMALL_BODY,
    Bench,
    Requests,
    error_code,
    interleave,
    merge_refused,
)
from bench.lib import (
    ROOT,
    BenchEnv,
    Conn,
    HttpError,
    Process,
    Target,
    get,
    median,
    percentile,
    post,
)
from bench.redact import code, prose
from sluicegate.redaction.bodies import BodyPolicy, redact_body
from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, load_rule_pack, load_rule_set

BEGIN = "<!-- bench readme: begin (python -m bench readme --readme README.md) -->"
END = "<!-- bench readme: end -->"
FIRST = re.compile(rb'"content": ?" ?[A-Za-z]')


@dataclass
class Row:
    what: str
    bare: str
    gateway: str
    result: str
    target: str
    met: bool | None = None

    def markdown(self) -> str:
        verdict = "" if self.met is None else (" (met)" if self.met else " (missed)")
        return (
            f"| {self.what} | {self.bare} | {self.gateway} | {self.result} | "
            f"{self.target}{verdict} |"
        )


@dataclass
class Sizes:
    rounds: int
    seconds: float
    serial: int
    events: int
    streams: int
    delta_mb: int
    engine_mb: float
    adversarial_mb: float
    engine_runs: int


FULL = Sizes(5, 4.0, 300, 2000, 50, 32, 4.0, 8.0, 3)
SMOKE = Sizes(1, 0.3, 30, 200, 10, 1, 0.2, 0.5, 1)


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def refusals(refused: dict[str, int]) -> str:
    """A row's note on answers that were refusals (503s), which the figures leave out."""
    if not refused:
        return ""
    listed = ", ".join(f"{n} x {key}" for key, n in sorted(refused.items()))
    return f" (refused, not counted: {listed})"


# -- proxy rows ------------------------------------------------------------------------------


def throughput(bench: Bench, proxies: dict[str, Process], sizes: Sizes) -> list[Row]:
    rows = []
    requests = Requests(post(bench.target(proxies["bare"]), CHAT, SMALL_BODY))
    cpu: dict[str, list[float]] = {"bare": [], "gateway": []}
    refused: dict[str, dict[str, int]] = {}
    for clients in (10, 50):
        runs = interleave(
            proxies,
            sizes.rounds,
            lambda n, c=clients: asyncio.run(
                bench.closed_loop(proxies[n], c, sizes.seconds, requests)
            ),
        )
        rps = {n: median([r.rps for r in rs]) for n, rs in runs.items()}
        for n, rs in runs.items():
            cpu[n] += [r.cpu_us_per_request for r in rs]
            refused[n] = merge_refused(rs)
        ratio = rps["gateway"] / rps["bare"]
        rows.append(
            Row(
                f"small JSON requests, HTTPS/CONNECT keep-alive, {clients} clients",
                f"{fmt(rps['bare'])} req/s{refusals(refused['bare'])}",
                f"{fmt(rps['gateway'])} req/s{refusals(refused['gateway'])}",
                f"{ratio:.2f}x",
                ">= 0.90x",
                ratio >= 0.90,
            )
        )
    b, g = median(cpu["bare"]), median(cpu["gateway"])
    rows.append(
        Row(
            "proxy CPU per small request",
            f"{b / 1e3:.2f} ms",
            f"{g / 1e3:.2f} ms",
            f"{g / b:.2f}x",
            "<= 1.15x",
            g / b <= 1.15,
        )
    )
    return rows


def latency(bench: Bench, proxies: dict[str, Process], sizes: Sizes) -> list[Row]:
    requests = Requests(post(bench.target(proxies["bare"]), CHAT, SMALL_BODY))
    runs = interleave(
        proxies,
        sizes.rounds,
        lambda n: asyncio.run(bench.serial(proxies[n], requests, sizes.serial)),
    )
    p50 = {n: median([percentile(r.latencies, 0.5) * 1e3 for r in rs]) for n, rs in runs.items()}
    p99 = {n: median([percentile(r.latencies, 0.99) * 1e3 for r in rs]) for n, rs in runs.items()}
    a50, a99 = p50["gateway"] - p50["bare"], p99["gateway"] - p99["bare"]
    refused = merge_refused(runs["gateway"])
    return [
        Row(
            "one client, one small request at a time, p50 / p99" + refusals(refused),
            f"{p50['bare']:.2f} / {p99['bare']:.2f} ms",
            f"{p50['gateway']:.2f} / {p99['gateway']:.2f} ms",
            f"{a50:+.2f} / {a99:+.2f} ms",
            "added <= 1 / 2 ms",
            a50 <= 1.0 and a99 <= 2.0,
        )
    ]


async def _one_stream(target: Target, path: str) -> tuple[float, int]:
    conn = await Conn.open(target)
    await conn.stream(get(target, "/sse?n=3"), FIRST)
    _, total, size = await conn.stream(get(target, path), FIRST)
    await conn.close()
    return total, size


def sse(bench: Bench, env: BenchEnv, gateway: Process, sizes: Sizes) -> list[Row]:
    bare = env.start_bare("bare-stream", stream=True)
    proxies = {"bare": bare, "gateway": gateway}
    rounds = max(3, sizes.rounds)
    refused: dict[str, int] = {}
    try:
        one = _interleaved_values(
            proxies,
            rounds,
            lambda p: asyncio.run(_one_stream(bench.target(p), f"/sse?n={sizes.events}"))[0],
            refused,
        )
        many = _interleaved_values(
            proxies,
            max(1, rounds // 2),
            lambda p: max(t for _, t in asyncio.run(bench.streams(p, sizes.streams, sizes.events))),
            refused,
        )
        delta = 4096
        count = sizes.delta_mb * 1_000_000 // (delta + 200)

        def rate(p: Process) -> float:
            total, size = asyncio.run(_one_stream(bench.target(p), f"/sse?n={count}&delta={delta}"))
            return size / total / 1e6

        mbs = _interleaved_values(proxies, max(1, rounds // 2), rate, refused)
    finally:
        bare.stop()
    if refused:
        print(f"SSE rounds refused (503) and repeated: {refused}", flush=True)
    r1 = one["gateway"] / one["bare"]
    r50 = many["gateway"] / many["bare"]
    return [
        Row(
            f"one SSE stream of {sizes.events:,} unpaced events",
            f"{one['bare'] * 1e3:.0f} ms",
            f"{one['gateway'] * 1e3:.0f} ms",
            f"{r1:.2f}x",
            "<= 1.2x",
            r1 <= 1.2,
        ),
        Row(
            f"{sizes.streams} concurrent SSE streams of {sizes.events:,} unpaced events, all done",
            f"{many['bare']:.2f} s",
            f"{many['gateway']:.2f} s",
            f"{r50:.2f}x",
            "<= 1.3x",
            r50 <= 1.3,
        ),
        Row(
            f"one SSE stream of 4 KiB deltas ({sizes.delta_mb} MB)",
            f"{mbs['bare']:.1f} MB/s",
            f"{mbs['gateway']:.1f} MB/s",
            f"{mbs['gateway'] / mbs['bare']:.2f}x",
            ">= 50 MB/s",
            mbs["gateway"] >= 50,
        ),
    ]


def _interleaved_values(
    proxies: dict[str, Process],
    rounds: int,
    measure: Callable[[Process], float],
    refused: dict[str, int] | None = None,
) -> dict[str, float]:
    """Medians of interleaved rounds. A round answered 503 is counted in `refused` and left
    out (and repeated, up to as many times again); one that never succeeds stops the bench."""
    values: dict[str, list[float]] = {n: [] for n in proxies}
    refused = {} if refused is None else refused

    def once(name: str) -> float | None:
        try:
            return measure(proxies[name])
        except HttpError as e:
            if e.status != 503:
                raise
            key = f"{name} 503"
            refused[key] = refused.get(key, 0) + 1
            return None

    for name in proxies:  # warm-up, not counted
        once(name)
    for i in range(rounds):
        for name in list(proxies) if i % 2 == 0 else list(reversed(proxies)):
            for _ in range(2):
                value = once(name)
                if value is not None:
                    values[name].append(value)
                    break
    for name, got in values.items():
        if not got:
            raise SystemExit(f"{name}: every round was refused (503): {refused}")
    return {n: median(v) for n, v in values.items()}


# -- loop stall ------------------------------------------------------------------------------


def adversarial_bodies(megabytes: float) -> dict[str, bytes]:
    """Bodies meant to cost the most per byte: many tiny JSON strings and keys (each one a
    text for the rules), text dense in rule keywords that are no secrets, one long string."""
    size = int(megabytes * 1_000_000)
    small = json.dumps(
        [{"k": "password", "token": "sk-", "v": i % 10} for i in range(size // 48)]
    ).encode()
    keywords = " ".join(
        ["api_key=", "ghp_", "sk-", "AKIA", "xoxb-", "-----BEGIN", "password:", "Bearer"]
    )
    dense = json.dumps({"messages": [{"role": "user", "content": (keywords + " ") * (size // 64)}]})
    long = json.dumps({"input": "a" * size})
    return {
        "many tiny strings": small,
        "keyword-dense text": dense.encode(),
        "one long string": long.encode(),
    }


async def _stall(target: Target, adversarial: bytes, probe: bytes) -> tuple[float, float, str]:
    """(median idle latency, worst latency while `adversarial` is in flight) of probes, ms;
    and how the adversarial body was answered ("200", or "503 <code>" when refused)."""
    prober = await Conn.open(target)
    sender = await Conn.open(target)
    idle = []
    for _ in range(30):
        start = time.perf_counter()
        await prober.request(probe)
        idle.append(time.perf_counter() - start)
    busy: list[float] = []
    done = asyncio.Event()

    async def probe_loop() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await prober.request(probe)
            busy.append(time.perf_counter() - start)

    task = asyncio.create_task(probe_loop())
    response = await sender.request(adversarial)
    done.set()
    await task
    await prober.close()
    await sender.close()
    answer = "200"
    if response.status == 503:  # refused within the time budget: fail closed, not a bench error
        answer = f"503 {error_code(response.body)}"
    elif response.status != 200:
        raise SystemExit(f"adversarial body answered {response.status}: {response.body[:200]!r}")
    return median(idle) * 1e3, max(busy or [0.0]) * 1e3, answer


def loop_stall(bench: Bench, proxies: dict[str, Process], sizes: Sizes) -> list[Row]:
    rows = []
    bodies = adversarial_bodies(sizes.adversarial_mb)
    worst_gateway = 0.0
    parts = []
    for label, body in bodies.items():
        stalls: dict[str, float] = {}
        answers: dict[str, str] = {}
        for name in ("bare", "gateway"):
            target = bench.target(proxies[name])
            raw = post(target, CHAT, body)
            probe = post(target, CHAT, SMALL_BODY)
            idle, worst, answers[name] = asyncio.run(_stall(target, raw, probe))
            stalls[name] = worst - idle
        worst_gateway = max(worst_gateway, stalls["gateway"])
        said = "" if answers["gateway"] == "200" else f" (answered {answers['gateway']})"
        parts.append(f"{label}: bare {stalls['bare']:.0f}, gateway {stalls['gateway']:.0f}{said}")
    rows.append(
        Row(
            f"worst stall of another caller during one adversarial {sizes.adversarial_mb:g} MB "
            "body (" + "; ".join(parts) + " ms)",
            "",
            f"{worst_gateway:.0f} ms",
            "",
            "<= 50 ms",
            worst_gateway <= 50,
        )
    )
    return rows


# -- the redaction engine --------------------------------------------------------------------


def agent_payloads(megabytes: float, seed: int = 7) -> list[bytes]:
    """Chat requests as agents send them: long messages of prose and code, tool-call
    arguments (JSON in a string), a few tool definitions."""
    rng = random.Random(seed)
    out, total = [], 0
    while total < megabytes * 1_000_000:
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": prose(rng, 2_000)},
        ]
        for _ in range(rng.randint(4, 12)):
            if rng.random() < 0.4:
                arguments = {"path": "src/app.py", "content": code(rng, rng.randint(500, 6_000))}
                messages.append(
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_" + "".join(rng.choices(string.ascii_letters, k=24)),
                                "type": "function",
                                "function": {"name": "write", "arguments": json.dumps(arguments)},
                            }
                        ],
                    }
                )
            else:
                maker = rng.choice([prose, code])
                messages.append({"role": "user", "content": maker(rng, rng.randint(500, 8_000))})
        body = json.dumps({"model": "gpt-x", "messages": messages, "stream": True}).encode()
        out.append(body)
        total += len(body)
    return out


def small_string_documents(megabytes: float, seed: int = 8) -> list[bytes]:
    """API specs and tool schemas: many short keys and values, a few words each."""
    rng = random.Random(seed)
    words = prose(rng, 4_000).split()
    out, total = [], 0
    while total < megabytes * 1_000_000:
        properties = {}
        for i in range(rng.randint(200, 600)):
            name = f"{rng.choice(words).strip('.,?:').lower()}_{i}"
            properties[name] = {
                "type": rng.choice(["string", "integer", "boolean", "array"]),
                "description": " ".join(rng.choices(words, k=rng.randint(2, 8))),
                "example": rng.choice(["abc", "42", "true", "2024-01-01", "user@example.com"]),
                "enum": rng.sample(["a", "b", "c", "d", "e", "f"], k=3),
            }
        body = json.dumps(
            {"openapi": "3.1.0", "components": {"schemas": {"Thing": {"properties": properties}}}}
        ).encode()
        out.append(body)
        total += len(body)
    return out


def engine_rate(redactor: Redactor, docs: list[bytes], runs: int) -> float:
    """MB/s of CPU time, best of `runs`, as the buffered path redacts a JSON body."""
    policy = BodyPolicy()
    size = sum(len(d) for d in docs) / 1e6
    best = float("inf")
    for _ in range(runs):
        start = time.process_time()
        for doc in docs:
            redact_body(doc, "application/json", redactor, policy)
        best = min(best, time.process_time() - start)
    return size / best


def engine(sizes: Sizes) -> list[Row]:
    paths = [ROOT / "rules"]
    profiles = sorted(load_rule_set(paths).profiles)
    agent = agent_payloads(sizes.engine_mb)
    small = small_string_documents(sizes.engine_mb)
    rows = []
    for profile in ["default"] + [p for p in profiles if p != "default"]:
        redactor = Redactor(load_rule_pack(paths, profile), Direction.REQUEST)
        a = engine_rate(redactor, agent, sizes.engine_runs)
        s = engine_rate(redactor, small, sizes.engine_runs)
        default = profile == "default"
        rows.append(
            Row(
                f"redaction engine, `{profile}` profile: agent JSON payloads / many small strings",
                "",
                f"{a:.0f} / {s:.1f} MB/s",
                "",
                ">= 100 / 20 MB/s" if default else "",
                (a >= 100 and s >= 20) if default else None,
            )
        )
    return rows


# -- main ------------------------------------------------------------------------------------


def render(rows: list[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| what | bare mitmdump | gateway | ratio / added | target |",
        "|---|---|---|---|---|",
        *(row.markdown() for row in rows),
    ]
    return "\n".join(lines)


def update_readme(path: Path, table: str) -> None:
    text = path.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: no {BEGIN!r} ... {END!r} markers")
    path.write_text(text[: start + len(BEGIN)] + "\n" + table + "\n" + text[end:])


SECTIONS = ("throughput", "latency", "sse", "stall", "engine")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round (CI)")
    parser.add_argument("--rounds", type=int, help="rounds per proxy (interleaved)")
    parser.add_argument("--seconds", type=float, help="length of a throughput round")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--readme", type=Path, help="rewrite the table in this README")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.rounds:
        sizes.rounds = args.rounds
    if args.seconds:
        sizes.seconds = args.seconds
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(sections) - set(SECTIONS):
        parser.error(f"sections: {', '.join(SECTIONS)}")
    load = os.getloadavg()[0]
    header = (
        f"mitmproxy {version.VERSION}, Python {'.'.join(map(str, sys.version_info[:3]))}, "
        f"{os.cpu_count()} CPUs, load {load:.1f} at start; {sizes.rounds} interleaved rounds, "
        "medians" + (" (SMOKE: sizes too small to mean anything)" if args.smoke else "")
    )
    print(header, flush=True)
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="sluicegate-bench-readme-"))
    started: list[Process] = []
    try:
        proxy_sections = {"throughput", "latency", "sse", "stall"} & set(sections)
        if proxy_sections:
            env = BenchEnv(work)
            upstream = env.start_upstream()
            started.append(upstream)
            bare = env.start_bare()
            started.append(bare)
            gateway = env.start_gateway(env.config(upstream.port))
            started.append(gateway)
            bench = Bench(env, upstream, argparse.Namespace(quick=args.smoke))
            proxies = {"bare": bare, "gateway": gateway}
            for name in sections:
                before = len(rows)
                if name == "throughput":
                    rows += throughput(bench, proxies, sizes)
                elif name == "latency":
                    rows += latency(bench, proxies, sizes)
                elif name == "sse":
                    rows += sse(bench, env, gateway, sizes)
                elif name == "stall":
                    rows += loop_stall(bench, proxies, sizes)
                for row in rows[before:]:
                    print(row.markdown(), flush=True)
            errors = [line for line in gateway.lines if "error" in line.lower()]
            if errors:
                print(f"gateway logged {len(errors)} error line(s), e.g.: {errors[0].strip()}")
        if "engine" in sections:
            before = len(rows)
            rows += engine(sizes)
            for row in rows[before:]:
                print(row.markdown(), flush=True)
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(work, ignore_errors=True)
    table = render(rows, header)
    print("\n" + table)
    if args.json:
        args.json.write_text(
            json.dumps({"header": header, "rows": [row.__dict__ for row in rows]}, indent=1)
        )
    if args.readme:
        update_readme(args.readme, table)
    return 0
