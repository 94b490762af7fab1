"""Two gaps in mitmproxy's HTTP/1 layer that hand bytes past every hook (or crash it).

**Upgrades.** After a `101 Switching Protocols` the HTTP/1 connection layers turn into a pipe
(`_http1.should_make_pipe`) the moment the upstream's head is read, before any addon saw the
response; mitmproxy then relays the connection as raw TCP (or crashes on the bytes that follow
once an addon refused the 101, logging them). The gateway accepts no upgrade but a WebSocket
handshake (whose messages the WebSockets addon redacts), so the wrapped `should_make_pipe` pipes
only those: for any other 101 the upstream connection stays HTTP, and MessageParts answers the
flow with 502 `upgrade_refused`.

**Trailers.** mitmproxy 11 and 12 raise `NotImplementedError("HTTP trailers are not implemented
yet.")` inside `Http1Connection.read_body` when a chunked HTTP/1.1 message ends with trailer
fields: the connection handler crashes ("mitmproxy has crashed!"), the client waits forever and
the flow is recorded only when it leaves. The wrapped `read_body` hands trailers on as the same
`RequestTrailers` / `ResponseTrailers` events the HTTP/2 layer emits, so they land in
`flow.request.trailers` / `flow.response.trailers` where MessageParts inspects them. mitmproxy's
HTTP/1 layers cannot *send* trailers either (an `AssertionError` on the event): trailers bound
for an HTTP/1.1 peer are dropped (RFC 9110 6.5.1 lets an intermediary discard them), so they
only ever reach HTTP/2 peers, inspected.

ProxyHardening installs both once per process; like the other patches they stay installed when
the script is unloaded.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Generator
from typing import Any, Final

import h11
from mitmproxy import http
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import _events, _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp

from sluicegate import mitmcompat

logger = logging.getLogger("sluicegate.hardening")

_MARK: Final = "_sluicegate_http1"


def websocket_handshake(request: http.Request, response: http.Response) -> bool:
    """A 101 mitmproxy turns into a WebSocket connection (any other would be raw bytes)."""
    return (
        response.status_code == 101
        and response.headers.get("upgrade", "").strip().lower() == "websocket"
        and request.headers.get("sec-websocket-version", "").strip() == "13"
    )


def _piping(should_make_pipe: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    @functools.wraps(should_make_pipe)
    def wrapper(request: http.Request, response: http.Response) -> bool:
        if response.status_code == 101 and not websocket_handshake(request, response):
            return False
        return should_make_pipe(request, response)

    setattr(wrapper, _MARK, True)
    return wrapper


Reader = Callable[[Any, events.Event], Generator[commands.Command, Any, None]]


class _TrailerReader:
    """A body reader that hands h11's EndOfMessage trailers to `on_trailers` and strips them."""

    def __init__(self, reader: Any, on_trailers: Callable[[list[tuple[bytes, bytes]]], None]):
        self._reader = reader
        self._on_trailers = on_trailers

    def _strip(self, event: Any) -> Any:
        if isinstance(event, h11.EndOfMessage) and event.headers:
            self._on_trailers([(bytes(k), bytes(v)) for k, v in event.headers])
            return h11.EndOfMessage()
        return event

    def __call__(self, buf: Any) -> Any:
        return self._strip(self._reader(buf))

    def read_eof(self) -> Any:
        return self._strip(self._reader.read_eof())


def _reading_trailers(read_body: Reader) -> Reader:
    @functools.wraps(read_body)
    def wrapper(self: Any, event: events.Event) -> Generator[commands.Command, Any, None]:
        found: list[list[tuple[bytes, bytes]]] = []
        reader = getattr(self, "body_reader", None)
        if reader is not None and not isinstance(reader, _TrailerReader):
            self.body_reader = _TrailerReader(reader, found.append)
        for command in read_body(self, event):
            if found and _is_end_of_message(command):
                trailers = http.Headers(found.pop())
                kind = (
                    _events.RequestTrailers
                    if isinstance(self, _http1.Http1Server)
                    else _events.ResponseTrailers
                )
                yield ReceiveHttp(kind(self.stream_id, trailers))
            yield command

    setattr(wrapper, _MARK, True)
    return wrapper


def _is_end_of_message(command: commands.Command) -> bool:
    return isinstance(command, ReceiveHttp) and isinstance(
        command.event, (_events.RequestEndOfMessage, _events.ResponseEndOfMessage)
    )


Sender = Callable[[Any, Any], Generator[commands.Command, Any, None]]


def _dropping_trailers(send: Sender) -> Sender:
    @functools.wraps(send)
    def wrapper(self: Any, event: Any) -> Generator[commands.Command, Any, None]:
        if isinstance(event, (_events.RequestTrailers, _events.ResponseTrailers)):
            logger.debug("sluicegate: trailers not sent to an HTTP/1 peer (dropped)")
            return
        yield from send(self, event)

    setattr(wrapper, _MARK, True)
    return wrapper


def install() -> None:
    """Pipe only WebSocket upgrades; read HTTP/1 trailers, never write them (idempotent)."""
    mitmcompat.require("http1_protocol")
    if not getattr(_http1.should_make_pipe, _MARK, False):
        _http1.should_make_pipe = _piping(_http1.should_make_pipe)  # type: ignore[assignment]
    base = _http1.Http1Connection
    if not getattr(base.read_body, _MARK, False):
        base.read_body = _reading_trailers(base.read_body)  # type: ignore[method-assign,assignment]
    for cls in (_http1.Http1Server, _http1.Http1Client):
        if not getattr(cls.send, _MARK, False):
            cls.send = _dropping_trailers(cls.send)  # type: ignore[method-assign,assignment]
