"""Raw proxy conversations httpx cannot have: read a refused CONNECT's body, pick the inner SNI."""

from __future__ import annotations

import base64
import json
import socket
import ssl
from dataclasses import dataclass
from typing import Any


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        return self.json()["error"]["code"]


def basic(token: str, user: str = "agent") -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def read_message(sock: socket.socket | ssl.SSLSocket) -> tuple[str, dict[str, str], bytes] | None:
    """One HTTP/1.1 message with a content-length body: (start line, lower-cased headers, body),
    or None when the peer closed before a whole head arrived."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    start_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return start_line, headers, body


def read_response(sock: socket.socket | ssl.SSLSocket) -> RawResponse:
    """One HTTP/1.1 response with a content-length body (what the gateway's refusals carry)."""
    message = read_message(sock)
    if message is None:
        raise ConnectionError("the connection closed before a response head")
    status_line, headers, body = message
    return RawResponse(int(status_line.split()[1]), headers, body)


def open_tunnel(
    proxy_port: int, target: str, proxy_authorization: str | None = None
) -> tuple[socket.socket, RawResponse]:
    """Send CONNECT `target` to the gateway; returns the socket and the gateway's answer."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=20)
    request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if proxy_authorization is not None:
        request += f"Proxy-Authorization: {proxy_authorization}\r\n"
    sock.sendall((request + "\r\n").encode())
    return sock, read_response(sock)


def connect(proxy_port: int, target: str, proxy_authorization: str | None = None) -> RawResponse:
    sock, response = open_tunnel(proxy_port, target, proxy_authorization)
    sock.close()
    return response


def get_in_tunnel(
    proxy_port: int,
    target: str,
    proxy_authorization: str,
    *,
    context: ssl.SSLContext,
    server_hostname: str,
    path: str = "/echo",
    headers: dict[str, str] | None = None,
) -> RawResponse:
    """GET `path` through a CONNECT tunnel, with TLS to the gateway for `server_hostname` (SNI)."""
    sock, established = open_tunnel(proxy_port, target, proxy_authorization)
    assert established.status == 200, established
    with context.wrap_socket(sock, server_hostname=server_hostname) as tls:
        lines = [f"GET {path} HTTP/1.1", f"Host: {server_hostname}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return read_response(tls)
