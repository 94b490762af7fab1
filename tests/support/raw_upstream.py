"""A raw HTTP/1.1 upstream (TLS when given a certificate): handlers write whatever bytes they like.

`FakeUpstream` speaks correct HTTP; the faults an upstream can commit (closing mid-body, a wrong
content-length, malformed chunking, truncated compression) need a server that does not. Each
request's head (and a content-length body) is read, recorded, and the socket handed to the
handler registered for its path; the connection is closed when the handler returns.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import threading
from collections.abc import Callable

from tests.support.pki import ServerCert
from tests.support.socket_server import SocketServer
from tests.support.wire import read_message


@dataclasses.dataclass
class RawRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Handler = Callable[[socket.socket, RawRequest], None]


class RawUpstream(SocketServer):
    def __init__(self, cert: ServerCert | None = None) -> None:
        self.received: list[RawRequest] = []
        self._handlers: dict[str, Handler] = {}
        self._lock = threading.Lock()
        super().__init__(cert)

    def url(self, path: str) -> str:
        return f"{'https' if self._context else 'http'}://127.0.0.1:{self.port}{path}"

    def handle(self, path: str, handler: Handler) -> None:
        self._handlers[path] = handler

    def reset(self) -> None:
        with self._lock:
            self.received = []
            self._handlers = {}

    def _serve(self, raw: socket.socket) -> None:
        try:
            context = self._context
            with context.wrap_socket(raw, server_side=True) if context else raw as sock:
                sock.settimeout(60)
                request = _read_request(sock)
                if request is None:
                    return
                with self._lock:
                    self.received.append(request)
                    handler = self._handlers.get(request.path.split("?", 1)[0])
                if handler is None:
                    sock.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    return
                handler(sock, request)
        except (OSError, ssl.SSLError):
            return


def _read_request(sock: socket.socket) -> RawRequest | None:
    message = read_message(sock)
    if message is None:
        return None
    request_line, headers, body = message
    method, path, _ = request_line.split(" ", 2)
    return RawRequest(method, path, headers, body)


def head(status: int = 200, **headers: str) -> bytes:
    """A response head; keyword names use `_` for `-` (`content_type="text/event-stream"`)."""
    lines = [f"HTTP/1.1 {status} X"] + [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
