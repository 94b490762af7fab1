"""A threaded TCP server on 127.0.0.1 (TLS when given a certificate): the shared base of the test
upstreams that speak raw sockets (RawUpstream, WsUpstream)."""

from __future__ import annotations

import socket
import ssl
import threading

from tests.support.pki import ServerCert


class SocketServer:
    """Accepts connections on an ephemeral port and serves each in its own thread (`_serve`).

    Subclasses set up their own state before calling `__init__`, which starts accepting."""

    def __init__(self, cert: ServerCert | None = None) -> None:
        self._context: ssl.SSLContext | None = None
        if cert is not None:
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(cert.cert_file, cert.key_file)
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raise NotImplementedError
