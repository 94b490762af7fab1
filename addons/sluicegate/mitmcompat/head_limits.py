"""A cap on HTTP/1 message heads, enforced while mitmproxy is still reading them.

mitmproxy buffers an HTTP/1 head until its blank line, without any limit ("FIXME: protect against
header size DoS" in its HTTP/1 layer), and no addon hook runs before the head is complete: any
client that can reach the port, authenticated or not, could make the gateway buffer an endless
header. This module wraps the HTTP/1 layer's `read_headers` so that a head still incomplete past
`gateway.max_header_bytes` ends the connection: a client gets 431 `headers_too_large` (the JSON
error shape), an upstream's answer becomes a 502 for the agent. Complete heads over the limits
are refused by ProxyHardening's `requestheaders` (it knows the flow, so the refusal is recorded).

ProxyHardening installs the wrapper once per process and sets `limit` from the config; like
`protocol_errors`, it stays installed when the script is unloaded.
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

# Bytes an incomplete head may take before the connection is refused (set from the config).
limit: int = DEFAULT_MAX_HEAD_BYTES


def too_large_response() -> bytes:
    """431 with the gateway's JSON error body, as raw HTTP/1.1 (there is no flow to answer)."""
    request_id = str(uuid.uuid4())
    response = http.Response.make(
        431,
        guard.error_body(CODE, MESSAGE, request_id),
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


def install() -> None:
    """Cap incomplete HTTP/1 heads on both sides from now on (idempotent)."""
    mitmcompat.require("head_limits")
    for cls, from_client in ((_http1.Http1Server, True), (_http1.Http1Client, False)):
        if not getattr(cls.read_headers, _MARK, False):
            capped = _capped(cls.read_headers, from_client=from_client)
            cls.read_headers = capped  # type: ignore[method-assign]
