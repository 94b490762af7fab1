"""The control listener: one small HTTP/1.1 server on a loopback port, inside the mitmdump process.

Deliberately small (asyncio, no dependencies): one request per connection (`connection: close`),
heads up to 16 KiB, bodies up to 64 KiB, a request read within 10 seconds. What it serves is
mounted by path prefix, so each concern brings its own routes and none knows the others:

    listener.mount("/v1", approvals_api)      # the approvals control API (admin token)
    listener.mount("/console", console)       # the web console (session cookies, CSRF)
    listener.mount("/healthz", health)        # ... whatever comes next

A handler takes a `Request` and returns a `Response`; the longest matching prefix wins (a
prefix matches itself and anything below it, `/v1` matches `/v1/grants`, not `/v1x`). A
response is either whole (`body`) or streamed (`stream`, an async iterator of byte chunks, e.g.
server-sent events), which ends when the client goes away or the listener stops.

`start()` binds synchronously (a taken port is reported at once) and serves on the running event
loop; `stop()` closes the listening socket and every open connection at once, so a reloaded
script can bind the same port again. No module here imports mitmproxy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import socket
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

logger = logging.getLogger("sluicegate.control")

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
CLIENT_SECONDS = 10.0
MAX_STREAMS = 64  # long-lived responses (event streams) open at once

REASONS = {
    200: "OK",
    204: "No Content",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    421: "Misdirected Request",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    target: str  # as sent: path and query
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes = b""
    peer: str = ""

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.target).path

    @property
    def query(self) -> str:
        return urllib.parse.urlsplit(self.target).query

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    def cookies(self) -> dict[str, str]:
        jar: dict[str, str] = {}
        for part in self.header("cookie").split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name and name not in jar:
                jar[name] = value.strip()
        return jar

    def form(self) -> dict[str, str]:
        """An `application/x-www-form-urlencoded` body (last value of a repeated field)."""
        ctype = self.header("content-type").split(";", 1)[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            return {}
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError:
            return {}
        return dict(urllib.parse.parse_qsl(text, keep_blank_values=True))

    def params(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.query, keep_blank_values=True))


@dataclasses.dataclass
class Response:
    status: int = 200
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None

    @classmethod
    def json(
        cls, status: int, payload: Any, headers: list[tuple[str, str]] | None = None
    ) -> Response:
        return cls(
            status,
            [("content-type", "application/json"), *(headers or [])],
            json.dumps(payload).encode(),
        )


Handler = Callable[[Request], Awaitable[Response]]


class ControlListener:
    """HTTP/1.1 on a loopback port; handlers mounted by path prefix (see the module docstring)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._mounts: dict[str, Handler] = {}
        self._sock: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._streams = 0

    # -- routes -------------------------------------------------------------------------------

    def mount(self, prefix: str, handler: Handler) -> None:
        prefix = "/" + prefix.strip("/")
        if prefix in self._mounts:
            raise ValueError(f"{prefix} is mounted already")
        self._mounts[prefix] = handler

    def handler_for(self, path: str) -> Handler | None:
        best: str | None = None
        for prefix in self._mounts:
            if (
                prefix == "/"
                or path == prefix
                or path.startswith(prefix + "/")
                or path.startswith(prefix + "?")
            ) and (best is None or len(prefix) > len(best)):
                best = prefix
        return None if best is None else self._mounts[best]

    async def handle(self, request: Request) -> Response:
        """Answer one request (also what tests call without a socket)."""
        handler = self.handler_for(request.path)
        if handler is None:
            return Response.json(404, {"error": "not_found", "message": "no such endpoint"})
        try:
            return await handler(request)
        except Exception:
            logger.exception("sluicegate: control listener: handler failed")
            return Response.json(500, {"error": "internal_error", "message": "internal error"})

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def start(self) -> int:
        family = socket.AF_INET6 if _is_v6(self.host) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.requested_port))
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(self._serve(sock))
        return self.port

    async def _serve(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._connection, sock=sock, limit=MAX_HEAD_BYTES)

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._sock is not None:
            self._sock.close()
        for writer in list(self._writers):
            writer.close()
        self._sock = self._server = self._task = None

    # -- the wire -----------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            try:
                async with asyncio.timeout(CLIENT_SECONDS):
                    request = await self._read(reader, writer)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                request = None
                response = Response.json(
                    400, {"error": "bad_request", "message": "incomplete request"}
                )
            except _BadRequest as e:
                request = None
                response = Response.json(e.status, {"error": e.code, "message": str(e)})
            if request is not None:
                response = await self.handle(request)
            await self._write(writer, response)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # The listener stops (or the loop shuts down) while a stream is open: this task is
            # the connection's top level, so ending quietly is all there is to do.
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
            raise _BadRequest("malformed request line")
        method, target = parts[0], parts[1]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, sep, value = line.partition(":")
                if not sep or not name.strip() or name != name.strip():
                    raise _BadRequest("malformed header")
                headers[name.lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise _BadRequest("chunked request bodies are not accepted")
        length = headers.get("content-length", "0")
        if not length.isdigit():
            raise _BadRequest("bad content-length")
        if int(length) > MAX_BODY_BYTES:
            raise _BadRequest("request body too large", 413, "too_large")
        body = await reader.readexactly(int(length)) if int(length) else b""
        return Request(method, target, headers, body, str(writer.get_extra_info("peername")))

    async def _write(self, writer: asyncio.StreamWriter, response: Response) -> None:
        names = {name.lower() for name, _ in response.headers}
        head = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Status')}"]
        head += [f"{name}: {value}" for name, value in response.headers]
        if "cache-control" not in names:
            head.append("cache-control: no-store")
        head.append("connection: close")
        if response.stream is None:
            head.append(f"content-length: {len(response.body)}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)
            await writer.drain()
            return
        if self._streams >= MAX_STREAMS:
            busy = Response.json(503, {"error": "busy", "message": "too many open streams"})
            await self._write(writer, busy)
            return
        self._streams += 1
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            await writer.drain()
            async for chunk in response.stream:
                if writer.is_closing():
                    break
                writer.write(chunk)
                await writer.drain()
        finally:
            self._streams -= 1
            aclose = getattr(response.stream, "aclose", None)
            if aclose is not None:
                await aclose()


class _BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _is_v6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
