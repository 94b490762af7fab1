"""A WebSocket upstream and a WebSocket client through the gateway, both on wsproto over sockets.

The upstream (TLS with the test CA) records what it received and answers by a tiny protocol the
test drives from the client side:
- text `say:<hex>`        the server sends the UTF-8 text hex-encoded in `<hex>` (so the client's
                          own message, redacted on the way up, does not carry it)
- text `bytes:<hex>`      the server sends the bytes as a binary message
- text `echo-credential`  the server sends the credential it received on the upgrade (as upstreams
                          quote a bad key in errors)
- text `split:<text>`     the server sends each piece of the text (written backwards, pieces
                          separated by U+001E) as its own text message (`say_split`)
- text `slow:<s>:<text>`  the same, sleeping `<s>` seconds between the pieces
- text `close:<s>:<text>` the server sleeps `<s>` seconds, sends the text (written backwards, if
                          any) and closes (1000), reading what still comes until the answer
- any other text / bytes  echoed back unchanged
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import threading
import time
from typing import Any

import wsproto
import wsproto.events as ev
from wsproto import ConnectionType, WSConnection

from tests.support.pki import ServerCert
from tests.support.socket_server import SocketServer
from tests.support.wire import basic, open_tunnel


@dataclasses.dataclass
class Upgrade:
    """One upgrade request as the upstream received it."""

    target: str
    headers: dict[str, str]


def say(text: str) -> str:
    """A message asking the upstream to send `text`, written backwards so that the request
    itself carries no secret (hex or base64 would not do: the gateway decodes those)."""
    return "say:" + text[::-1]


def say_bytes(data: bytes) -> str:
    """A message asking the upstream to send `data` as a binary message (ASCII data, written
    backwards like `say`)."""
    return "bytes:" + data.decode("ascii")[::-1]


SEPARATOR = "\x1e"


def say_split(pieces: list[str], pause: float | None = None) -> str:
    """A message asking the upstream to send `pieces` as separate messages (backwards, as `say`),
    pausing `pause` seconds between them."""
    text = SEPARATOR.join(pieces)[::-1]
    return f"slow:{pause}:{text}" if pause is not None else "split:" + text


def say_then_close(text: str = "", pause: float = 0.0) -> str:
    """A message asking the upstream to wait `pause` seconds, send `text` (backwards, as `say`;
    nothing when empty) and close the connection."""
    return f"close:{pause}:{text[::-1]}"


class WsUpstream(SocketServer):
    """A threaded WebSocket server on 127.0.0.1 (TLS when given a certificate)."""

    def __init__(self, cert: ServerCert | None = None) -> None:
        self.upgrades: list[Upgrade] = []
        self.received: list[str | bytes] = []
        self.closes: list[int | None] = []
        self._lock = threading.Lock()
        super().__init__(cert)

    def url(self, path: str = "/v1/realtime") -> str:
        return f"{'wss' if self._context else 'ws'}://127.0.0.1:{self.port}{path}"

    def reset(self) -> None:
        with self._lock:
            self.upgrades, self.received, self.closes = [], [], []

    def _serve(self, raw: socket.socket) -> None:
        sock: socket.socket = raw
        try:
            if self._context is not None:
                sock = self._context.wrap_socket(raw, server_side=True)
            sock.settimeout(30)
            ws = WSConnection(ConnectionType.SERVER)
            credential = ""
            while True:
                data = sock.recv(65536)
                ws.receive_data(data or None)
                for event in ws.events():
                    if isinstance(event, ev.Request):
                        headers = {k.decode().lower(): v.decode() for k, v in event.extra_headers}
                        with self._lock:
                            self.upgrades.append(Upgrade(event.target, headers))
                        credential = headers.get("authorization", "").removeprefix("Bearer ")
                        sock.sendall(ws.send(ev.AcceptConnection()))
                    elif isinstance(event, ev.Message):
                        with self._lock:
                            self.received.append(event.data)
                        if ws.state != wsproto.ConnectionState.OPEN:
                            continue  # it closed: reading what still comes, answering nothing
                        data = event.data
                        if isinstance(data, str) and data.startswith("close:"):
                            _, seconds, text = data.split(":", 2)
                            time.sleep(float(seconds))
                            if text:
                                sock.sendall(ws.send(ev.TextMessage(text[::-1])))
                            sock.sendall(ws.send(ev.CloseConnection(code=1000)))
                            continue
                        if isinstance(data, str) and data.startswith(("split:", "slow:")):
                            pause = 0.0
                            if data.startswith("slow:"):
                                _, seconds, data = data.split(":", 2)
                                pause = float(seconds)
                            else:
                                data = data[6:]
                            for n, piece in enumerate(data[::-1].split(SEPARATOR)):
                                if n and pause:
                                    time.sleep(pause)
                                sock.sendall(ws.send(ev.TextMessage(piece)))
                            continue
                        sock.sendall(ws.send(self._answer(event.data, credential)))
                    elif isinstance(event, ev.CloseConnection):
                        with self._lock:
                            self.closes.append(event.code)
                        if ws.state == wsproto.ConnectionState.REMOTE_CLOSING:
                            sock.sendall(ws.send(event.response()))
                        return
                    elif isinstance(event, ev.Ping):
                        sock.sendall(ws.send(event.response()))
                if not data:
                    return
        except (OSError, wsproto.utilities.LocalProtocolError, ssl.SSLError):
            return
        finally:
            sock.close()

    @staticmethod
    def _answer(data: str | bytes, credential: str) -> ev.Message:
        if isinstance(data, bytes):
            return ev.BytesMessage(data)
        if data.startswith("say:"):
            return ev.TextMessage(data[4:][::-1])
        if data.startswith("bytes:"):
            return ev.BytesMessage(data[6:][::-1].encode())
        if data == "echo-credential":
            return ev.TextMessage(f'{{"error": "invalid key {credential}"}}')
        return ev.TextMessage(data)


@dataclasses.dataclass
class Rejected:
    """The gateway (or upstream) answered the upgrade with an HTTP response instead of 101."""

    status: int
    body: bytes


class WsClient:
    """A WebSocket client in a CONNECT tunnel through the gateway."""

    def __init__(self, sock: ssl.SSLSocket, ws: WSConnection) -> None:
        self.sock = sock
        self.ws = ws
        self._events: list[ev.Event] = []

    def send(self, data: str | bytes) -> None:
        message = ev.TextMessage(data) if isinstance(data, str) else ev.BytesMessage(data)
        self.sock.sendall(self.ws.send(message))

    def receive(self, timeout: float = 10) -> ev.Event:
        """The next message or close (a peer's close is answered); ConnectionClosed at EOF."""
        self.sock.settimeout(timeout)
        while not self._events:
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, ev.Message) and not event.message_finished:
                    raise AssertionError("fragmented test messages are not supported")
                closing = self.ws.state == wsproto.ConnectionState.REMOTE_CLOSING
                if isinstance(event, ev.CloseConnection) and closing:
                    self.sock.sendall(self.ws.send(event.response()))
                self._events.append(event)
        return self._events.pop(0)

    def text(self, timeout: float = 10) -> str:
        event = self.receive(timeout)
        assert isinstance(event, ev.TextMessage), event
        return event.data

    def close(self) -> None:
        try:
            if self.ws.state == wsproto.ConnectionState.OPEN:
                self.sock.sendall(self.ws.send(ev.CloseConnection(code=1000)))
                self.receive(timeout=5)
        except (OSError, AssertionError, wsproto.utilities.LocalProtocolError):
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> WsClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def ws_connect(
    proxy_port: int,
    upstream: WsUpstream,
    token: str,
    *,
    ca_file: str,
    path: str = "/v1/realtime",
    headers: dict[str, str] | None = None,
) -> WsClient | Rejected:
    """Open a tunnel to `upstream` through the gateway and ask for a WebSocket upgrade."""
    target = f"127.0.0.1:{upstream.port}"
    sock, established = open_tunnel(proxy_port, target, basic(token))
    assert established.status == 200, established
    context = ssl.create_default_context(cafile=ca_file)
    tls = context.wrap_socket(sock, server_hostname="127.0.0.1")
    ws = WSConnection(ConnectionType.CLIENT)
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    tls.sendall(ws.send(ev.Request(host=target, target=path, extra_headers=extra)))
    tls.settimeout(20)
    status, body = 0, b""
    while True:
        data = tls.recv(65536)
        ws.receive_data(data or None)
        for event in ws.events():
            if isinstance(event, ev.AcceptConnection):
                return WsClient(tls, ws)
            if isinstance(event, ev.RejectConnection):
                status = event.status_code
                if not event.has_body:
                    tls.close()
                    return Rejected(status, b"")
            elif isinstance(event, ev.RejectData):
                body += event.data
                if event.body_finished:
                    tls.close()
                    return Rejected(status, body)
        if not data:
            tls.close()
            return Rejected(status, body)
