"""mitmproxy's own error answers become the gateway's JSON errors, with a request id.

When mitmproxy itself gives up on a flow (the upstream is unreachable, its TLS certificate does
not verify, it closes mid-body or sends a malformed head), it answers the agent with an HTML page
of its own (`format_error`) that no SDK can read and that names no request id. No addon hook can
replace it: the `error` hook runs before mitmproxy sends it, and a response set there is ignored.

Two patches, both installed by ProxyHardening with `protocol_errors` (and like it kept when the
script is unloaded):

- `HttpStream.handle_protocol_error` (the one place a flow's upstream error is sent to the
  client, HTTP/1 and HTTP/2 alike): when it sends a `ResponseProtocolError` to the client and
  no response head has gone out yet, `responder(flow, status, message)` is asked for the
  response to send instead; it is sent as an ordinary response (`ResponseHeaders`,
  `ResponseData`, `ResponseEndOfMessage`) and set as `flow.response`.
- `_http1.make_error_response` (HTTP/1 errors outside any flow, e.g. an unparseable request
  head, and any error the first patch leaves alone): the same JSON shape, with a fresh request
  id that is logged.

Internals touched (contract-tested in tests/unit/test_mitmcompat.py): `HttpStream.
handle_protocol_error(self, event)` is a command generator with `self.flow` and
`self.context.client`, yielding `SendHttp(ResponseProtocolError, client)`; the HTTP event classes'
constructors; `ResponseProtocolError.code` (an int on 11.0.x, an `ErrorCode` with
`http_status_code()` on 12.x); `_http1.make_error_response(status_code, message) -> bytes` looked
up as a module global by `Http1Server`.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Callable, Generator
from typing import Any, Final

from mitmproxy import http
from mitmproxy.net.http import http1, status_codes
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _events, _http1

from sluicegate import mitmcompat

logger = logging.getLogger("sluicegate.errors")

_MARK: Final = "_sluicegate_error_answers"
REQUEST_ID_HEADER: Final = "x-sluicegate-request-id"

# mitmproxy refuses a CONNECT on a listener that is not a proxy itself (`validate_request`, the
# same words on 11.0.x and 12.x): in `HttpStream.check_invalid`, which runs the requestheaders
# and error hooks but ignores a response they set, then sends a 400 `ResponseProtocolError`
# (HTTP/1: `make_error_response`). In the gateway that listener is the base-URL one (reverse
# mode; the proxy listener takes CONNECT), so the answer is its own refusal of proxy requests.
CONNECT_NOT_A_PROXY: Final = (
    "received an http connect request even though it is not running in regular/upstream mode"
)
BASE_URL_PROXY_REQUEST: Final = "base_url_proxy_request"
BASE_URL_PROXY_MESSAGE: Final = (
    "This is the gateway's base-URL listener: send requests to it as to the API "
    "(e.g. OPENAI_BASE_URL=http://<gateway>:<port>/openai/v1), not through it as a "
    "proxy (the proxy is HTTPS_PROXY, on the gateway's proxy port)."
)

# Set by ProxyHardening: (flow, status, mitmproxy's (scrubbed) message) -> the response to send
# instead of mitmproxy's error page, or None to leave it.
responder: Callable[[http.HTTPFlow, int, str], http.Response | None] | None = None


def classify(status: int, message: str) -> tuple[int, str, str]:
    """(status, code, message for the agent) for one of mitmproxy's error messages.

    The agent's message never quotes mitmproxy's (it may name internal addresses); the log does.
    """
    text = message.lower()
    if "sluicegate: egress refused" in text:  # mitmcompat/upstream_connect's check
        return 403, "egress_internal", "The destination resolves to an internal address."
    if CONNECT_NOT_A_PROXY in text:
        return 405, BASE_URL_PROXY_REQUEST, BASE_URL_PROXY_MESSAGE
    if status == 400 or status == 413 or status == 431:
        code = {413: "body_too_large", 431: "headers_too_large"}.get(status, "bad_request")
        return status, code, "The gateway could not read this request."
    if "certificate" in text or "tls" in text or "ssl" in text:
        return (
            502,
            "upstream_tls_failed",
            "The upstream's TLS certificate did not verify (or its TLS handshake failed); "
            "nothing was sent to it.",
        )
    if "timed out" in text or "timeout" in text:
        return 504, "upstream_timeout", "The upstream did not answer in time."
    if any(w in text for w in ("disconnect", "eof", "closed", "reset by peer")):
        return 502, "upstream_closed", "The upstream closed the connection before answering."
    if any(w in text for w in ("connect", "resolve", "getaddrinfo", "name or service", "refused")):
        return 502, "upstream_unreachable", "The upstream could not be reached."
    return 502, "upstream_protocol_error", "The upstream's answer was malformed or incomplete."


def json_response(status: int, code: str, message: str, request_id: str) -> http.Response:
    body = json.dumps(
        {
            "error": {
                "code": code,
                "message": message,
                "type": "sluicegate_error",
                "request_id": request_id,
            }
        }
    ).encode()
    return http.Response.make(
        status,
        body,
        {
            "content-type": "application/json",
            "cache-control": "no-store",
            REQUEST_ID_HEADER: request_id,
        },
    )


def _make_error_response(status_code: int, message: str = "") -> bytes:
    """`_http1.make_error_response`, in JSON: errors of no flow (or none the responder took)."""
    status, code, text = classify(status_code, message)
    request_id = str(uuid.uuid4())
    logger.info(
        "sluicegate: mitmproxy answered %s %s [request %s]: %s", status, code, request_id, message
    )
    response = json_response(status, code, text, request_id)
    response.headers["connection"] = "close"
    return bytes(http1.assemble_response(response))


def http_status(code: Any) -> int | None:
    """The HTTP status of a protocol error's code: an int on 11.0.x (NO_RESPONSE: none), an
    `ErrorCode` with `http_status_code()` on 12.x (None: nothing is sent)."""
    if isinstance(code, int):
        return None if code == status_codes.NO_RESPONSE else code
    return code.http_status_code()


def _wrap(handle: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Any]:
    @functools.wraps(handle)
    def handle_protocol_error(self: Any, event: Any) -> Generator[Any, Any, Any]:
        commands = handle(self, event)
        result: Any = None
        while True:
            try:
                command = commands.send(result)
            except StopIteration as stop:
                return stop.value
            replacement = _replacement(self, command)
            if replacement is None:
                result = yield command
            else:
                for part in replacement:
                    result = yield part
                result = None

    setattr(handle_protocol_error, _MARK, True)
    return handle_protocol_error


def _replacement(stream: Any, command: Any) -> list[Any] | None:
    """The commands sending our JSON answer instead of `command`, when it is mitmproxy's error
    answer to the client and no response head went out yet."""
    if responder is None or not isinstance(command, http_layers.SendHttp):
        return None
    event = command.event
    if (
        not isinstance(event, _events.ResponseProtocolError)
        or command.connection is not stream.context.client
    ):
        return None
    status = http_status(event.code)
    if status is None:
        return None  # mitmproxy sends nothing (a killed flow, a client gone)
    flow = stream.flow
    if flow.response is not None and flow.response.stream:
        return None  # streamed: the head is out, the client gets a cut stream
    try:
        response = responder(flow, status, event.message)
    except Exception:
        logger.exception("sluicegate: error answer failed; mitmproxy's own is sent")
        return None
    if response is None:
        return None
    flow.response = response
    sid = event.stream_id
    return [
        http_layers.SendHttp(_events.ResponseHeaders(sid, response, False), command.connection),
        http_layers.SendHttp(
            _events.ResponseData(sid, response.content or b""), command.connection
        ),
        http_layers.SendHttp(_events.ResponseEndOfMessage(sid), command.connection),
    ]


def install() -> None:
    """Answer mitmproxy's errors with JSON from now on (idempotent)."""
    mitmcompat.require("error_answers")
    stream_cls = http_layers.HttpStream
    if not getattr(stream_cls.handle_protocol_error, _MARK, False):
        stream_cls.handle_protocol_error = _wrap(stream_cls.handle_protocol_error)  # type: ignore[method-assign]
    _http1.make_error_response = _make_error_response  # type: ignore[assignment,unused-ignore]
