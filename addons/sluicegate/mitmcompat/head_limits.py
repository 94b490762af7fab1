"""Caps on HTTP/1 message heads (size and time), enforced while mitmproxy is still reading them.

mitmproxy buffers an HTTP/1 head until its blank line, without any limit ("FIXME: protect against
header size DoS" in its HTTP/1 layer), and no addon hook runs before the head is complete: any
client that can reach the port, authenticated or not, could make the gateway buffer an endless
header. This module wraps the HTTP/1 layer's `read_headers` so that a head still incomplete past
`gateway.max_header_bytes` ends the connection: a client gets 431 `headers_too_large` (the JSON
error shape), an upstream's answer becomes a 502 for the agent. Complete heads over the limits
are refused by ProxyHardening's `requestheaders` (it knows the flow, so the refusal is recorded).

Time: mitmproxy closes a connection only after ten minutes without a byte, so a client that
trickles a head (or sends half of one and waits) holds a connection, unauthenticated, for as
long as it likes: a few hundred of them are a denial of service. Each HTTP/1 request head must
be complete within `timeout` seconds (from the connection's start for the first head, from its
first byte for later ones on a keep-alive connection): the server side asks mitmproxy for a
wakeup (`RequestWakeup`) when the head starts and, if that head is still incomplete when it
fires, answers 408 `header_timeout` and closes the connection.

ProxyHardening installs the wrappers once per process and sets `limit` and `timeout` from the
config; like `protocol_errors`, they stay installed when the script is unloaded.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Generator
from typing import Any, Final

from mitmproxy import http
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import _events, _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp

from sluicegate import mitmcompat
from sluicegate.mitm import guard

logger = logging.getLogger("sluicegate.hardening")

DEFAULT_MAX_HEAD_BYTES: Final = 64 * 1024
CODE: Final = "headers_too_large"
MESSAGE: Final = "The request's headers are larger than the gateway accepts; nothing was forwarded."
_MARK: Final = "_sluicegate_capped"

TIMEOUT_CODE: Final = "header_timeout"
TIMEOUT_MESSAGE: Final = "The request head did not arrive in time; the connection was closed."
DEFAULT_HEAD_TIMEOUT: Final = 30.0
_ARMED: Final = "_sluicegate_head_wakeup"

# Bytes an incomplete head may take before the connection is refused (set from the config).
limit: int = DEFAULT_MAX_HEAD_BYTES
# Seconds a request head may take (set from the config).
timeout: float = DEFAULT_HEAD_TIMEOUT


def too_large_response() -> bytes:
    """431 with the gateway's JSON error body, as raw HTTP/1.1 (there is no flow to answer)."""
    return _error_response(431, CODE, MESSAGE)


def _error_response(status: int, code: str, message: str) -> bytes:
    request_id = str(uuid.uuid4())
    response = http.Response.make(
        status,
        guard.error_body(code, message, request_id),
        {
            "content-type": "application/json",
            "cache-control": "no-store",
            "connection": "close",
            guard.REQUEST_ID_HEADER: request_id,
        },
    )
    return assemble_response(response)


def _response_error(stream_id: int, message: str) -> _events.ResponseProtocolError:
    error_codes: Any = getattr(_events, "ErrorCode", None)
    if error_codes is None:  # mitmproxy 11: the status sent to the client, 502 by default
        # mypy checks against the installed line: on 12 `code` is required (unreached there).
        return _events.ResponseProtocolError(stream_id, message)  # type: ignore[call-arg,unused-ignore]
    return _events.ResponseProtocolError(stream_id, message, error_codes.RESPONSE_VALIDATION_FAILED)


# Http1Server.read_headers and Http1Client.read_headers (their event parameter types differ).
Reader = Callable[..., Generator[commands.Command, Any, None]]


def _capped(read_headers: Reader, *, from_client: bool) -> Reader:
    @functools.wraps(read_headers)
    def wrapper(self: Any, event: events.Event) -> Generator[commands.Command, Any, None]:
        if from_client and isinstance(event, events.DataReceived) and len(self.buf):
            yield from _arm(self)  # a head has started (no-op if this one is armed already)
        yield from read_headers(self, event)
        if self.state != self.read_headers or len(self.buf) <= limit:
            return
        self.state = self.done
        if from_client:
            logger.warning("sluicegate: %s: refused a request head over %d bytes", CODE, limit)
            yield commands.SendData(self.conn, too_large_response())
            yield commands.CloseConnection(self.conn)
        else:
            logger.warning("sluicegate: upstream response head over %d bytes: refused", limit)
            yield commands.CloseConnection(self.conn)
            if self.stream_id is not None:
                message = f"upstream response head larger than {limit} bytes"
                yield ReceiveHttp(_response_error(self.stream_id, message))

    setattr(wrapper, _MARK, True)
    return wrapper


def _arm(layer: Any) -> Generator[commands.Command, Any, None]:
    """Ask for a wakeup `timeout` seconds from now for the head of the current stream."""
    armed = getattr(layer, _ARMED, None)
    if armed is not None and armed[1] == layer.stream_id:
        return
    wakeup = commands.RequestWakeup(timeout)
    setattr(layer, _ARMED, (wakeup, layer.stream_id))
    yield wakeup


def _timed_start(start: Reader) -> Reader:
    @functools.wraps(start)
    def wrapper(self: Any, event: events.Event) -> Generator[commands.Command, Any, None]:
        yield from start(self, event)
        yield from _arm(self)  # the first head is due from the connection's start

    setattr(wrapper, _MARK, True)
    return wrapper


def _timed_events(handle_event: Reader) -> Reader:
    @functools.wraps(handle_event)
    def wrapper(self: Any, event: events.Event) -> Generator[commands.Command, Any, None]:
        if not isinstance(event, events.Wakeup):
            yield from handle_event(self, event)
            return
        armed = getattr(self, _ARMED, None)
        if armed is None or event.command is not armed[0]:
            return  # an earlier head's deadline: that head arrived
        if self.state != self.read_headers or self.stream_id != armed[1]:
            return
        logger.warning(
            "sluicegate: %s: closed a connection whose request head took over %.0f s",
            TIMEOUT_CODE,
            timeout,
        )
        self.state = self.done
        yield commands.SendData(self.conn, _error_response(408, TIMEOUT_CODE, TIMEOUT_MESSAGE))
        yield commands.CloseConnection(self.conn)

    setattr(wrapper, _MARK, True)
    return wrapper


def install() -> None:
    """Cap incomplete HTTP/1 heads on both sides from now on (idempotent)."""
    mitmcompat.require("head_limits")
    for cls, from_client in ((_http1.Http1Server, True), (_http1.Http1Client, False)):
        if not getattr(cls.read_headers, _MARK, False):
            capped = _capped(cls.read_headers, from_client=from_client)
            cls.read_headers = capped  # type: ignore[method-assign]
    server = _http1.Http1Server
    if not getattr(server.start, _MARK, False):
        server.start = _timed_start(server.start)  # type: ignore[method-assign]
        server.state = server.start  # the class default state is `start` itself
    if not getattr(server._handle_event, _MARK, False):
        server._handle_event = _timed_events(server._handle_event)  # type: ignore[method-assign]
