"""End-to-end benchmark of streamed SSE: the sluicegate gateway against bare mitmdump.

    python -m bench sse [--runs 30] [--events 2000] [--big-mb 1024] [--profile]

Everything runs on loopback in this process's machine: a local plain-HTTP SSE upstream (started
here), a bare `mitmdump --set stream_large_bodies=1` (so it streams too, instead of buffering
whole responses) and the gateway (`mitmdump -s addons/gateway.py`, default rule pack, token auth
on every request). Both proxies are measured in the same run, interleaved, with keep-alive
clients, after a warm-up. Measured:

  * time to first token: request sent -> first event with content text received (median, p90);
  * total time for one `--events` stream (one chunk per event), written as fast as possible (the
    harshest case: proxy CPU per event is all that counts) and paced `--pace-ms` apart (models
    pace tokens at several to tens of milliseconds);
  * RSS of each proxy process before / at peak / after a `--big-mb` stream of 4 KiB deltas,
    which must stay flat (bounded by one event and the hold-back cap, not the stream length).

`--profile` also runs the addon's stream function in-process on the same event stream under
cProfile and prints where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import http.server
import io
import os
import pstats
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "addons"), str(ROOT)]

from bench.upstream import chunk_event as chat_event  # noqa: E402
from tests.support.tokens import TestIdP  # noqa: E402

MITMDUMP = Path(sys.executable).with_name("mitmdump")
LISTENING = re.compile(r"proxy listening at (?:\*|[\d.]+|\[[^\]]*\]):(\d+)")
WORDS = "The quick brown fox jumps over the lazy dog while the build runs and the tests pass. "


# -- the upstream ---------------------------------------------------------------------------------


def token_events(count: int, pace: float = 0.0) -> Iterator[bytes]:
    words = WORDS.split(" ")
    yield chat_event(None, role=True)
    for i in range(count):
        if pace:
            time.sleep(pace)
        yield chat_event(" " + words[i % len(words)])
    yield chat_event(None, finish="stop")
    yield b"data: [DONE]\n\n"


def big_events(total: int, delta: int = 4096) -> Iterator[bytes]:
    text = (WORDS * (delta // len(WORDS) + 1))[:delta]
    event = chat_event(text)
    yield chat_event(None, role=True)
    for _ in range(max(1, total // len(event))):
        yield event
    yield b"data: [DONE]\n\n"


class Upstream:
    """`/tokens?n=N&pace_us=P`: N one-word events, P µs apart; `/big?bytes=B`: B bytes of
    4 KiB-text events. One chunk per event, TCP_NODELAY."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: int(v[0]) for k, v in parse_qs(url.query).items()}
                if url.path == "/tokens":
                    events = token_events(query["n"], query.get("pace_us", 0) / 1e6)
                elif url.path == "/big":
                    events = big_events(query["bytes"])
                else:
                    self.send_error(404)
                    return
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for event in events:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


# -- the proxies ----------------------------------------------------------------------------------


class Proxy:
    def __init__(self, name: str, args: list[str], workdir: Path) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [str(MITMDUMP), "--listen-host", "127.0.0.1", "--listen-port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.port = 0
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + 30
        while not self.port:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"{name} did not start:\n{''.join(self.lines)}")
            time.sleep(0.05)
        time.sleep(0.5)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            if not self.port and (m := LISTENING.search(line)):
                self.port = int(m.group(1))

    def rss(self) -> int:
        """Resident set size in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def client(self, token: str | None) -> httpx.Client:
        auth = f"bench:{token}@" if token else ""
        return httpx.Client(proxy=f"http://{auth}127.0.0.1:{self.port}", timeout=600)

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()


def gateway_config(idp: TestIdP, upstream: Upstream) -> dict[str, Any]:
    return {
        "version": 1,
        "gateway": {"name": "bench", "environment": "development"},
        "auth": idp.auth_config(),
        "routes": [{"name": "local", "host": "127.0.0.1", "port": upstream.port, "scheme": "http"}],
        "redaction": {"rules": [str(ROOT / "rules")]},
    }


# -- measurements ---------------------------------------------------------------------------------


def first_token(client: httpx.Client, url: str) -> tuple[float, float]:
    """Seconds to the first content event, and to the end of the stream."""
    start = time.perf_counter()
    first = 0.0
    with client.stream("GET", url) as response:
        assert response.status_code == 200, response.status_code
        for line in response.iter_lines():
            if not first and '"content": "' in line and '"content": ""' not in line:
                first = time.perf_counter() - start
    return first, time.perf_counter() - start


def stream_total(client: httpx.Client, url: str) -> tuple[float, int]:
    start = time.perf_counter()
    size = 0
    with client.stream("GET", url) as response:
        assert response.status_code == 200, response.status_code
        for chunk in response.iter_raw():
            size += len(chunk)
    return time.perf_counter() - start, size


def interleaved(
    names: list[str], runs: int, measure: Callable[[str], float], warmup: int = 3
) -> dict[str, list[float]]:
    for _ in range(warmup):
        for name in names:
            measure(name)
    results: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(runs):
        for name in names:
            results[name].append(measure(name))
    return results


def p90(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.9) - 1)]


def memory(proxy: Proxy, client: httpx.Client, url: str) -> tuple[int, int, int, float, int]:
    """RSS before, peak and after one big stream; seconds; bytes received."""
    before = proxy.rss()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proxy.rss())
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds, size = stream_total(client, url)
    done.set()
    sampler.join()
    time.sleep(0.5)
    return before, max(peak, proxy.rss()), proxy.rss(), seconds, size


def profile_in_process(events: int) -> None:
    """The addon's stream function on the same stream, under cProfile."""
    from mitmproxy import http
    from mitmproxy.test import taddons, tflow, tutils

    from sluicegate.mitm.streaming import StreamRedaction

    with tempfile.TemporaryDirectory() as tmp:
        idp = TestIdP(Path(tmp) / "idp")
        config = Path(tmp) / "gw.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "version": 1,
                    "auth": idp.auth_config(),
                    "redaction": {"rules": [str(ROOT / "rules")]},
                }
            )
        )
        addon = StreamRedaction()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, sluicegate_config=str(config))
            chunks = list(token_events(events))
            flow = tflow.tflow(
                resp=tutils.tresp(
                    headers=http.Headers([(b"content-type", b"text/event-stream")]), content=b""
                )
            )
            addon.responseheaders(flow)
            stream = flow.response.stream
            assert callable(stream)
            profiler = cProfile.Profile()
            start = time.perf_counter()
            profiler.enable()
            for chunk in chunks:
                stream(chunk)
            stream(b"")
            profiler.disable()
            took = time.perf_counter() - start
            addon.done()
    print(f"\nin-process stream function, {events} events: {took * 1e3:.1f} ms under cProfile")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(14)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start_at = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print("\n".join(lines[start_at : start_at + 15]))


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="measured runs per proxy")
    parser.add_argument("--events", type=int, default=2000, help="events in the total-time stream")
    parser.add_argument("--pace-ms", type=float, default=1.0, help="event spacing, paced stream")
    parser.add_argument("--big-mb", type=int, default=1024, help="size of the memory stream")
    parser.add_argument("--profile", action="store_true", help="cProfile the stream function")
    args = parser.parse_args(argv)

    upstream = Upstream()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        idp = TestIdP(work / "idp")
        config = work / "gateway.yaml"
        config.write_text(yaml.safe_dump(gateway_config(idp, upstream)))
        token = idp.mint("bench")
        proxies = {
            "bare": Proxy(
                "bare mitmdump",
                ["--set", f"confdir={work / 'bare'}", "--set", "stream_large_bodies=1"],
                work,
            ),
            "gateway": Proxy(
                "gateway",
                [
                    "--set",
                    f"confdir={work / 'gw'}",
                    "-s",
                    str(ROOT / "addons" / "gateway.py"),
                    "--set",
                    f"sluicegate_config={config}",
                ],
                work,
            ),
        }
        clients = {
            "direct": httpx.Client(timeout=600),
            "bare": proxies["bare"].client(None),
            "gateway": proxies["gateway"].client(token),
        }
        try:
            run(args, upstream, proxies, clients)
        finally:
            for client in clients.values():
                client.close()
            for proxy in proxies.values():
                proxy.stop()
    if args.profile:
        profile_in_process(args.events)


def run(
    args: argparse.Namespace,
    upstream: Upstream,
    proxies: dict[str, Proxy],
    clients: dict[str, httpx.Client],
) -> None:
    names = ["direct", "bare", "gateway"]
    print(
        "loopback, plain HTTP upstream; bare = mitmdump --set stream_large_bodies=1 (streams too);"
        f"\ngateway = full sluicegate chain, default rule pack; {args.runs} runs each, interleaved"
    )
    short = upstream.url("/tokens?n=20")
    ttft = interleaved(names, args.runs, lambda n: first_token(clients[n], short)[0] * 1e3)
    total_url = upstream.url(f"/tokens?n={args.events}")
    total = interleaved(
        names, max(5, args.runs // 3), lambda n: stream_total(clients[n], total_url)[0] * 1e3
    )
    paced_url = upstream.url(f"/tokens?n={args.events}&pace_us={int(args.pace_ms * 1000)}")
    paced = interleaved(names, 3, lambda n: stream_total(clients[n], paced_url)[0] * 1e3, warmup=1)

    print(f"\n{'':28}{'direct':>10}{'bare':>10}{'gateway':>10}{'gw - bare':>11}{'gw / bare':>11}")
    for label, values in (
        ("first token, median ms", {n: statistics.median(v) for n, v in ttft.items()}),
        ("first token, p90 ms", {n: p90(v) for n, v in ttft.items()}),
        (f"{args.events} events, median ms", {n: statistics.median(v) for n, v in total.items()}),
        (
            f"  paced {args.pace_ms:g} ms, median ms",
            {n: statistics.median(v) for n, v in paced.items()},
        ),
    ):
        d, b, g = (values[n] for n in names)
        print(f"{label:28}{d:10.2f}{b:10.2f}{g:10.2f}{g - b:11.2f}{g / b:11.2f}")
    overhead = statistics.median(ttft["gateway"]) - statistics.median(ttft["bare"])
    ratio = statistics.median(total["gateway"]) / statistics.median(total["bare"])
    ratio_paced = statistics.median(paced["gateway"]) / statistics.median(paced["bare"])
    print(
        f"\ntargets: first-token overhead {overhead:.2f} ms (<= 2: "
        f"{'met' if overhead <= 2 else 'MISSED'}); total ratio (<= 1.2): unpaced {ratio:.2f} "
        f"({'met' if ratio <= 1.2 else 'MISSED'}), paced {ratio_paced:.2f} "
        f"({'met' if ratio_paced <= 1.2 else 'MISSED'})"
    )

    big = args.big_mb << 20
    print(f"\nRSS for one {args.big_mb} MiB stream (4 KiB deltas), MiB:")
    print(f"{'':10}{'start':>9}{'peak':>9}{'end':>9}{'seconds':>10}{'MB/s':>8}")
    for name in ("bare", "gateway"):
        before, peak, after, seconds, size = memory(
            proxies[name], clients[name], upstream.url(f"/big?bytes={big}")
        )
        print(
            f"{name:10}{before / 2**20:9.1f}{peak / 2**20:9.1f}{after / 2**20:9.1f}"
            f"{seconds:10.1f}{size / seconds / 1e6:8.1f}"
        )


if __name__ == "__main__":
    main()
