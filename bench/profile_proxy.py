"""Where a request's (or an SSE event's) CPU goes, in the gateway and in bare mitmdump.

    python -m bench profile_proxy [--load small|sse|deltas] [--clients 10] [--seconds 8]
                                  [--top 25] [--json FILE]

Runs bare `mitmdump` and the gateway (`-s addons/gateway.py`, the full chain: token auth on
CONNECT, a route with an injected key, the default rule pack both ways, recording on), drives the
same load through each (one after the other): a closed loop of small JSON chat requests over
HTTPS/CONNECT keep-alive (`--load small`), or SSE streams one after the other, of 2,000 unpaced
one-word events (`sse`) or of 4 KiB deltas (`deltas`; bare streams with stream_large_bodies=1),
with cProfile on the proxy's event loop only while the load runs (`bench/_profile_addon.py`,
loaded into both, switched by signals: start-up and warm-up stay out), and adds up every
function's own time by where it lives:

- `sluicegate: <package>`: our addons and engines (`mitm`, `redaction`, `recording`, ...);
- `mitmproxy: dispatch` (addonmanager, hooks), `mitmproxy: proxy layers` (proxy/), `mitmproxy:
  builtin addons` (addons/), `mitmproxy: http and net`, `mitmproxy: other`;
- `h11 / h2 / wsproto`, `TLS (ssl, cryptography)`, `asyncio and sockets`, `json`, `hashing and
  signing`, `yaml and config`, `other Python`.

Each proxy first runs the load unprofiled (its CPU per request from /proc), then profiled; each
category's share of the profiled loop time (the wait in epoll left out) is applied to the
unprofiled CPU per request. cProfile inflates code that makes many small calls, ours and
mitmproxy's alike, so the split is an estimate; the total is measured. The machine may be shared:
the load at start and end is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.gateway import CHAT, SMALL_BODY, Bench, Requests, Round
from bench.gateway import FIRST_TOKEN as FIRST
from bench.lib import (
    UPSTREAM_KEY,
    UPSTREAM_KEY_ENV,
    BenchEnv,
    Conn,
    Process,
    get,
    post,
    start_mitmdump,
)

MITM_PARTS = (
    ("mitmproxy/addonmanager.py", "mitmproxy: dispatch"),
    ("mitmproxy/hooks.py", "mitmproxy: dispatch"),
    ("mitmproxy/proxy/", "mitmproxy: proxy layers"),
    ("mitmproxy/addons/", "mitmproxy: builtin addons"),
    ("mitmproxy/http.py", "mitmproxy: http and net"),
    ("mitmproxy/net/", "mitmproxy: http and net"),
    ("mitmproxy/coretypes/", "mitmproxy: http and net"),
    ("mitmproxy/connection.py", "mitmproxy: http and net"),
    ("mitmproxy/certs.py", "TLS (ssl, cryptography)"),
)


def category(filename: str, name: str) -> str:
    """Where a profiled function lives (its file; for built-ins, its name)."""
    path = filename.replace("\\", "/")
    if "/sluicegate/" in path:
        rest = path.split("/sluicegate/", 1)[1]
        package = rest.split("/", 1)[0] if "/" in rest else rest.removesuffix(".py")
        return f"sluicegate: {package}"
    if path.endswith("addons/gateway.py"):
        return "sluicegate: mitm"
    if "/mitmproxy/" in path:
        for part, label in MITM_PARTS:
            if part in path:
                return label
        return "mitmproxy: other"
    for part, label in (
        ("/h11/", "h11 / h2 / wsproto"),
        ("/h2/", "h11 / h2 / wsproto"),
        ("/hpack/", "h11 / h2 / wsproto"),
        ("/wsproto/", "h11 / h2 / wsproto"),
        ("/ssl.py", "TLS (ssl, cryptography)"),
        ("/OpenSSL/", "TLS (ssl, cryptography)"),
        ("/cryptography/", "TLS (ssl, cryptography)"),
        ("/asyncio/", "asyncio and sockets"),
        ("/selectors.py", "asyncio and sockets"),
        ("/socket.py", "asyncio and sockets"),
        ("/json/", "json"),
        ("/hashlib.py", "hashing and signing"),
        ("/yaml/", "yaml and config"),
    ):
        if part in path:
            return label
    if filename == "~":  # a built-in: classify by its name
        lowered = name.lower()
        for words, label in (
            (("ssl", "openssl", "_rust"), "TLS (ssl, cryptography)"),
            (("epoll", "select", "socket", "recv", "send", "_overlapped"), "asyncio and sockets"),
            (("json", "scanner", "encode_basestring"), "json"),
            (("sha256", "hashlib", "ed25519", "sign", "hmac"), "hashing and signing"),
            (("posix.write", "posix.stat", "posix.statvfs", "posix.access", "posix.fsync"),
             "file system (recording)"),
            (("regex", "_regex", "re.pattern", "sre", "hyperscan"), "regular expressions"),
        ):  # fmt: skip
            if any(w in lowered for w in words):
                return label
        return "built-ins (other)"
    return "other Python"


def profile_by_category(path: Path) -> tuple[dict[str, float], list[tuple[float, str]]]:
    """Own time per category (seconds), and (own time, function) of our own code. The event
    loop's wait for sockets (`epoll.poll`) is idle time, not work: left out."""
    stats = pstats.Stats(str(path))
    totals: dict[str, float] = {}
    ours: list[tuple[float, str]] = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, name), (_, _, tottime, _, _) in raw.items():
        if filename == "~" and name == "<method 'poll' of 'select.epoll' objects>":
            continue  # the event loop waiting for sockets
        label = category(filename, name)
        totals[label] = totals.get(label, 0.0) + tottime
        if label.startswith("sluicegate"):
            where = (
                filename.split("/sluicegate/", 1)[-1] if "/sluicegate/" in filename else filename
            )
            ours.append((tottime, f"{where}:{line}({name})"))
    ours.sort(reverse=True)
    return totals, ours


PROFILER = Path(__file__).resolve().parent / "_profile_addon.py"


def start_profiled(
    env: BenchEnv, name: str, upstream_port: int, out: Path, stream: bool = False
) -> Process:
    """Bare mitmdump or the gateway, with the profiler script loaded first (it has no hooks)."""
    args = [*env.common_args(), "-s", str(PROFILER)]
    environ = {"BENCH_PROFILE_OUT": str(out)}
    if name == "bare" and stream:
        args += ["--set", "stream_large_bodies=1"]  # so bare streams too
    if name == "gateway":
        config = env.config(upstream_port)
        args += ["-s", str(env.gateway_script), "--set", f"sluicegate_config={config}"]
        environ[UPSTREAM_KEY_ENV] = UPSTREAM_KEY
    return start_mitmdump(name, args, env.work, environ)


LOADS = {
    # name: (what one unit is, units per request, query of the stream; None: small requests)
    "small": ("request", 1, None),
    "sse": ("event", 2000, "/sse?n=2000"),
    "deltas": ("4 KiB delta", 500, "/sse?n=500&delta=4096"),
}


async def stream_loop(bench: Bench, proc: Process, path: str, seconds: float) -> Round:
    """Streams one after the other on one connection for `seconds`: CPU and count."""
    target = bench.target(proc)
    conn = await Conn.open(target)
    await conn.stream(get(target, "/sse?n=3"), FIRST)
    result = Round()
    before = proc.cpu()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        await conn.stream(get(target, path), FIRST)
        result.requests += 1
    result.seconds = time.perf_counter() - start
    result.proxy_cpu = proc.cpu() - before
    await conn.close()
    return result


def measure(
    bench: Bench,
    proc: Process,
    clients: int,
    requests: Requests,
    path: str | None,
    seconds: float,
) -> Round:
    if path is None:
        return asyncio.run(bench.closed_loop(proc, clients, seconds, requests))
    return asyncio.run(stream_loop(bench, proc, path, seconds))


def run(
    env: BenchEnv, clients: int, seconds: float, work: Path, load: str = "small"
) -> dict[str, Any]:
    upstream = env.start_upstream()
    out: dict[str, Any] = {}
    try:
        for name in ("bare", "gateway"):
            profile = work / f"{name}.prof"
            _, per_request, path = LOADS[load]
            proc = start_profiled(env, name, upstream.port, profile, stream=path is not None)
            try:
                # The proxies' CA exists once the first one started.
                bench = Bench(env, upstream, argparse.Namespace(quick=False))
                requests = Requests(post(bench.target(proc), CHAT, SMALL_BODY))
                load_args = (bench, proc, clients, requests, path)
                measure(*load_args, 1.0)  # warm-up
                # Unprofiled first: the real CPU per request the profile's shares divide up.
                plain = measure(*load_args, seconds)
                os.kill(proc.pid, signal.SIGUSR1)
                time.sleep(0.2)
                result = measure(*load_args, seconds)
                os.kill(proc.pid, signal.SIGUSR2)
                deadline = time.monotonic() + 30
                while not profile.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
            finally:
                proc.stop()
            if not profile.exists():
                raise SystemExit(f"{name}: no profile written")
            totals, ours = profile_by_category(profile)
            # The profile covers the measured window, and the warm-up requests of each
            # connection (one each) inside closed_loop.
            served = result.requests + result.refused_total() + (clients if path is None else 0)
            profiled = sum(totals.values())
            cpu = plain.cpu_us_per_request / per_request
            out[name] = {
                "requests": plain.requests,
                "refused": plain.refused,
                "rps": plain.rps,
                "cpu_us_per_request": cpu,
                "profiled_us_per_request": profiled / served / per_request * 1e6,
                # Each category's share of the profiled time, applied to the unprofiled CPU.
                "us": {k: v / profiled * cpu for k, v in totals.items()},
                "ours_top": [(t / profiled * cpu, f) for t, f in ours],
            }
    finally:
        upstream.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--top", type=int, default=25, help="our functions to list")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--smoke", action="store_true", help="a second per proxy (CI)")
    parser.add_argument(
        "--load",
        choices=sorted(LOADS),
        default="small",
        help="small JSON requests (default), SSE streams of 2,000 one-word events, or of 4 KiB "
        "deltas (bare mitmdump streams them too); figures per request, event or delta",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.top = 1.0, 5
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="sluicegate-bench-profile-"))
    try:
        figures = run(BenchEnv(work), args.clients, args.seconds, work, args.load)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bare, gateway = figures["bare"], figures["gateway"]
    unit = LOADS[args.load][0]
    print(
        f"load {load:.1f} at start, {os.getloadavg()[0]:.1f} at end; {args.clients} clients, "
        f"{args.seconds:g} s per proxy unprofiled, then as long under cProfile (one proxy after "
        "the other)"
    )
    for name in ("bare", "gateway"):
        f = figures[name]
        refused = f" ({sum(f['refused'].values())} refused)" if f["refused"] else ""
        print(
            f"{name:8} {f['requests']} requests{refused}, {f['rps']:.1f} req/s, "
            f"{f['cpu_us_per_request']:.1f} µs CPU per {unit} (unprofiled, /proc); profiled "
            f"loop time {f['profiled_us_per_request']:.0f} µs per {unit}"
        )
    ratio = gateway["cpu_us_per_request"] / bare["cpu_us_per_request"]
    print(f"gateway / bare CPU per {unit}: {ratio:.2f}x")
    labels = sorted(set(bare["us"]) | set(gateway["us"]), key=lambda k: -gateway["us"].get(k, 0.0))
    total_b, total_g = bare["cpu_us_per_request"], gateway["cpu_us_per_request"]
    print(
        f"\n| CPU per {unit}, by where it goes (µs: profile share x unprofiled CPU) "
        "| bare | gateway | added | share of gateway |"
    )
    print("|---|---|---|---|---|")
    for label in labels:
        b, g = bare["us"].get(label, 0.0), gateway["us"].get(label, 0.0)
        if max(b, g) < total_g / 200:
            continue
        print(f"| {label} | {b:.1f} | {g:.1f} | {g - b:+.1f} | {g / total_g:.0%} |")
    print(f"| total | {total_b:.1f} | {total_g:.1f} | {total_g - total_b:+.1f} | 100% |")
    print(f"\nour functions with the most own time (µs per {unit}, same scale):")
    for micros, function in gateway["ours_top"][: args.top]:
        print(f"  {micros:7.1f}  {function}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0
