"""What the gateway benchmarks share: processes, a bench environment and a cheap async client.

The client is a few lines of asyncio on raw sockets (CONNECT, TLS via `start_tls`, HTTP/1.1
keep-alive, Content-Length or chunked bodies) rather than httpx: on a 2-core machine the load
generator must cost much less CPU per request than the proxy it measures, or it measures itself.
Every benchmark prints the CPU the load generator and the upstream used, so that can be checked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "addons"), str(ROOT)]

from sluicegate.recording.chain import Signer  # noqa: E402
from tests.support.pki import TestCA  # noqa: E402
from tests.support.tokens import TestIdP  # noqa: E402

MITMDUMP = Path(sys.executable).with_name("mitmdump")
GATEWAY_SCRIPT = ROOT / "addons" / "gateway.py"
LISTENING = re.compile(r"proxy listening at (?:\*|[\d.]+|\[[^\]]*\]):(\d+)")
UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_KEY"
UPSTREAM_KEY = "sk-bench-upstream-0123456789abcdefghijklmnopqrstuv"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- processes --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Process:
    """A child process whose output is kept (and searched for a readiness line)."""

    def __init__(self, name: str, argv: Sequence[str], ready: re.Pattern[str], **kw: Any) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw
        )
        self.lines: list[str] = []
        self.port = 0
        self._ready = ready
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + 60
        while not self.port:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"{name} did not start:\n{''.join(self.lines[-40:])}")
            time.sleep(0.02)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            if len(self.lines) < 10_000:
                self.lines.append(line)
            if not self.port and (m := self._ready.search(line)):
                self.port = int(m.group(1))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        """Resident set size in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_upstream(cert_file: Path, key_file: Path) -> Process:
    """bench/upstream.py over HTTPS, in its own process (its own core and GIL)."""
    return Process(
        "upstream",
        [
            sys.executable,
            str(ROOT / "bench" / "upstream.py"),
            "--cert",
            str(cert_file),
            "--key",
            str(key_file),
        ],
        re.compile(r"listening on (\d+)"),
    )


def start_mitmdump(
    name: str,
    args: Sequence[str],
    workdir: Path,
    env: dict[str, str] | None = None,
    profile: Path | None = None,
) -> Process:
    """mitmdump on an ephemeral loopback port; under cProfile (written at exit) with `profile`."""
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        environ.pop(var, None)
    prefix = [sys.executable, "-m", "cProfile", "-o", str(profile)] if profile else []
    return Process(
        name,
        [*prefix, str(MITMDUMP), "--listen-host", "127.0.0.1", "--listen-port", "0", *args],
        LISTENING,
        cwd=workdir,
        env=environ,
    )


# -- the bench environment ----------------------------------------------------------------------


class BenchEnv:
    """One temp dir: upstream CA + certificate, IdP, recording key, the shared mitmproxy confdir."""

    def __init__(self, work: Path, gateway_script: Path | None = None) -> None:
        self.work = work
        self.gateway_script = gateway_script or GATEWAY_SCRIPT
        self.pki = TestCA(work / "pki")
        self.server = self.pki.issue("bench-upstream")
        self.idp = TestIdP(work / "idp")
        self.signing_key = work / "signing.pem"
        self.signing_key.write_bytes(Signer.generate().private_pem())
        self.confdir = work / "mitmproxy"
        self.token = self.idp.mint("bench-agent", ["agents"], ttl=24 * 3600)
        self._configs = 0

    def config(
        self,
        upstream_port: int,
        *,
        rules: Sequence[Path] = (ROOT / "rules",),
        recording: bool = True,
        max_body_bytes: int = 32 << 20,
        policy: dict[str, Any] | None = None,
    ) -> Path:
        """A full-chain gateway config file: auth, a route with an injected credential,
        redaction both ways, recording (own directory per config)."""
        self._configs += 1
        cfg: dict[str, Any] = {
            "version": 1,
            "gateway": {
                "name": "bench",
                "environment": "development",
                "max_body_bytes": max_body_bytes,
            },
            "auth": self.idp.auth_config(),
            "routes": [
                {
                    "name": "openai",
                    "host": "127.0.0.1",
                    "port": upstream_port,
                    "groups": ["agents"],
                    "credential": {"env": UPSTREAM_KEY_ENV},
                    "inject": {"header": "authorization", "template": "Bearer {secret}"},
                }
            ],
            "redaction": {"rules": [str(p) for p in rules]},
        }
        if recording:
            cfg["recording"] = {
                "directory": str(self.work / f"recordings-{self._configs}"),
                "signing_key": {"file": str(self.signing_key)},
            }
        if policy is not None:
            cfg["policy"] = policy
        path = self.work / f"gateway-{self._configs}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def start_upstream(self) -> Process:
        return start_upstream(self.server.cert_file, self.server.key_file)

    def common_args(self) -> list[str]:
        """Options both proxies get: the same CA and upstream trust, no per-flow console line."""
        return [
            "--set",
            f"confdir={self.confdir}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={self.pki.cert_file}",
            "--set",
            "flow_detail=0",
        ]

    def start_bare(self, name: str = "bare", *, stream: bool = False) -> Process:
        extra = ["--set", "stream_large_bodies=1"] if stream else []
        return start_mitmdump(name, [*self.common_args(), *extra], self.work)

    def start_gateway(
        self, config: Path, name: str = "gateway", profile: Path | None = None
    ) -> Process:
        args = [*self.common_args(), "-s", str(self.gateway_script)]
        args += ["--set", f"sluicegate_config={config}"]
        env = {UPSTREAM_KEY_ENV: UPSTREAM_KEY}
        return start_mitmdump(name, args, self.work, env, profile)

    def client_tls(self) -> ssl.SSLContext:
        """Trusts the proxies' CA (created in the shared confdir by the first proxy)."""
        return ssl.create_default_context(cafile=str(self.confdir / "mitmproxy-ca-cert.pem"))


# -- the client ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    proxy_port: int
    host: str
    port: int
    token: str | None
    tls: ssl.SSLContext
    extra_connect_headers: tuple[tuple[str, str], ...] = ()

    def connect_request(self) -> bytes:
        lines = [f"CONNECT {self.host}:{self.port} HTTP/1.1", f"host: {self.host}:{self.port}"]
        if self.token is not None:
            basic = base64.b64encode(f"agent:{self.token}".encode()).decode()
            lines.append(f"proxy-authorization: Basic {basic}")
        lines += [f"{k}: {v}" for k, v in self.extra_connect_headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


class HttpError(Exception):
    def __init__(self, status: int, body: bytes = b"") -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


@dataclasses.dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def _parse_head(head: bytes) -> tuple[int, dict[bytes, bytes]]:
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


class Conn:
    """One keep-alive HTTPS connection through a proxy's CONNECT tunnel."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, target: Target) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", target.proxy_port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(target.connect_request())
        status, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
        if status != 200:
            length = int(headers.get(b"content-length", b"0"))
            body = await reader.readexactly(length) if length else b""
            writer.close()
            raise HttpError(status, body)
        await writer.start_tls(target.tls, server_hostname=target.host)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> Response:
        """Send one request, read the whole response."""
        self.writer.write(raw)
        status, headers = _parse_head(await self.reader.readuntil(b"\r\n\r\n"))
        if b"content-length" in headers:
            length = int(headers[b"content-length"])
            body = await self.reader.readexactly(length) if length else b""
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = [chunk async for chunk in self._chunks()]
            body = b"".join(parts)
        else:
            body = b""
        return Response(status, headers, body)

    async def stream(self, raw: bytes, first: re.Pattern[bytes]) -> tuple[float, float, int]:
        """Send one request and read its chunked response: seconds to the first chunk matching
        `first`, seconds to the end, bytes received."""
        start = time.perf_counter()
        self.writer.write(raw)
        status, _ = _parse_head(await self.reader.readuntil(b"\r\n\r\n"))
        if status != 200:
            raise HttpError(status)
        first_at = 0.0
        size = 0
        async for chunk in self._chunks():
            size += len(chunk)
            if not first_at and first.search(chunk):
                first_at = time.perf_counter() - start
        return first_at, time.perf_counter() - start, size

    async def _chunks(self) -> Any:
        reader = self.reader
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return
            yield (await reader.readexactly(size + 2))[:-2]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def post(target: Target, path: str, body: bytes, extra: str = "") -> bytes:
    """A POST with a JSON body as an SDK sends it (its placeholder API key included)."""
    return (
        f"POST {path} HTTP/1.1\r\nhost: {target.host}:{target.port}\r\n"
        f"content-type: application/json\r\naccept: application/json\r\n"
        f"authorization: Bearer sk-agent-placeholder\r\n{extra}"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


def get(target: Target, path: str, extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nhost: {target.host}:{target.port}\r\n"
        f"accept: text/event-stream\r\nauthorization: Bearer sk-agent-placeholder\r\n{extra}\r\n"
    ).encode()


# -- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
