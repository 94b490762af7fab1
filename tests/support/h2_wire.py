"""HTTP/2 on raw sockets, both ends, for bytes libraries refuse to send.

`H2Upstream` is an HTTP/2-only TLS server (ALPN `h2`) whose handlers answer with any header
fields (CRLF in a value, an uppercase or odd name) and any trailers (gRPC's `grpc-message`).
`h2_exchange` is an HTTP/2 client through the gateway's CONNECT tunnel that sends any header
fields and trailers. Both use the `h2` library with header validation off, so nothing is
normalised on the way out: the gateway is what must refuse or clean it.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import threading
from collections.abc import Callable, Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from tests.support.pki import ServerCert
from tests.support.socket_server import SocketServer
from tests.support.wire import basic, open_tunnel

Fields = list[tuple[bytes, bytes]]


def _config(client_side: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
    )


@dataclasses.dataclass
class H2Message:
    """One request or response as received: header fields, body, trailers (None: none)."""

    headers: Fields = dataclasses.field(default_factory=list)
    body: bytes = b""
    trailers: Fields | None = None
    reset: bool = False  # the peer reset the stream

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.decode().lower() == name.lower():
                return value.decode("utf-8", "replace")
        return None

    @property
    def status(self) -> int:
        return int(self.header(":status") or 0)

    def raw(self) -> bytes:
        """Everything, for grepping."""
        fields = self.headers + (self.trailers or [])
        return b"\n".join(k + b": " + v for k, v in fields) + b"\n\n" + self.body


@dataclasses.dataclass
class H2Reply:
    headers: Fields
    body: bytes = b""
    trailers: Fields | None = None


H2Handler = Callable[[H2Message], H2Reply]


class H2Upstream(SocketServer):
    """An HTTP/2 (only) TLS upstream. Requests are recorded in `received`; `handle(path, fn)`."""

    def __init__(self, cert: ServerCert) -> None:
        self.received: list[H2Message] = []
        self._handlers: dict[str, H2Handler] = {}
        self._lock = threading.Lock()
        super().__init__(cert)
        assert self._context is not None
        self._context.set_alpn_protocols(["h2"])

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def handle(self, path: str, handler: H2Handler) -> None:
        self._handlers[path] = handler

    def reset(self) -> None:
        with self._lock:
            self.received = []
            self._handlers = {}

    def _serve(self, raw: socket.socket) -> None:
        assert self._context is not None
        try:
            with self._context.wrap_socket(raw, server_side=True) as sock:
                sock.settimeout(30)
                self._serve_h2(sock)
        except (OSError, ssl.SSLError, h2.exceptions.H2Error):
            return

    def _serve_h2(self, sock: ssl.SSLSocket) -> None:
        conn = h2.connection.H2Connection(_config(client_side=False))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        streams: dict[int, H2Message] = {}
        while True:
            data = sock.recv(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    streams[event.stream_id] = H2Message(headers=list(event.headers))
                elif isinstance(event, h2.events.DataReceived):
                    streams[event.stream_id].body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    streams[event.stream_id].trailers = list(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    self._answer(conn, event.stream_id, streams.pop(event.stream_id))
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return
            sock.sendall(conn.data_to_send())

    def _answer(self, conn: h2.connection.H2Connection, stream_id: int, got: H2Message) -> None:
        with self._lock:
            self.received.append(got)
            path = (got.header(":path") or "").split("?", 1)[0]
            handler = self._handlers.get(path)
        reply = handler(got) if handler else H2Reply([(b":status", b"404")])
        end_after_headers = not reply.body and reply.trailers is None
        conn.send_headers(stream_id, reply.headers, end_stream=end_after_headers)
        if reply.body:
            conn.send_data(stream_id, reply.body, end_stream=reply.trailers is None)
        if reply.trailers is not None:
            conn.send_headers(stream_id, reply.trailers, end_stream=True)


class PreferH2(ssl.SSLContext):
    def set_alpn_protocols(self, protocols: Sequence[str]) -> None:  # type: ignore[override]
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


def h2_exchange(
    proxy_port: int,
    ca_file: str,
    target: str,
    token: str,
    headers: Fields,
    body: bytes = b"",
    trailers: Fields | None = None,
    timeout: float = 20,
) -> H2Message:
    """One HTTP/2 request through a CONNECT tunnel (TLS to the gateway, ALPN h2), exactly as
    given: `headers` must hold the pseudo-headers. Returns the response as received."""
    sock, established = open_tunnel(proxy_port, target, basic(token))
    assert established.status == 200, established
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2"])
    host = target.rsplit(":", 1)[0]
    with context.wrap_socket(sock, server_hostname=host) as tls:
        assert tls.selected_alpn_protocol() == "h2"
        tls.settimeout(timeout)
        conn = h2.connection.H2Connection(_config(client_side=True))
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        end_after_headers = not body and trailers is None
        conn.send_headers(stream_id, headers, end_stream=end_after_headers)
        if body:
            conn.send_data(stream_id, body, end_stream=trailers is None)
        if trailers is not None:
            conn.send_headers(stream_id, trailers, end_stream=True)
        tls.sendall(conn.data_to_send())
        response = H2Message()
        while True:
            try:
                data = tls.recv(65536)
            except TimeoutError:
                raise TimeoutError("no complete HTTP/2 response from the gateway") from None
            if not data:
                response.reset = True
                return response
            for event in conn.receive_data(data):
                if getattr(event, "stream_id", stream_id) != stream_id:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    response.headers = list(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    response.body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    response.trailers = list(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    return response
                elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    response.reset = True
                    return response
            tls.sendall(conn.data_to_send())


def request_fields(
    method: str, authority: str, path: str, extra: Sequence[tuple[str | bytes, str | bytes]] = ()
) -> Fields:
    """Pseudo-headers plus `extra` fields, as bytes."""

    def b(x: str | bytes) -> bytes:
        return x if isinstance(x, bytes) else x.encode()

    fields = [
        (b":method", b(method)),
        (b":scheme", b"https"),
        (b":authority", b(authority)),
        (b":path", b(path)),
    ]
    return fields + [(b(k), b(v)) for k, v in extra]
