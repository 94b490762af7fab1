"""MessageParts: everything around the body is inspected or refused too (chain position 8).

Bodies have their own addons; this one covers the rest of each message, both ways:

- **Path** (request): read with the request rules once Routing made it canonical; a secret in
  it cannot be redacted without sending the request somewhere else, so the request is refused
  (403 `secret_in_path`) before anything leaves.
- **Header fields and trailers**: values redacted in place with the rule pack (requests: the
  request rules; responses: the response rules plus the flow's scrub literals, i.e. every
  encoding of the injected credential and the caller's token), cookies pair by pair, URL-valued
  fields with their query read as a form (`redaction/headers.py`). A secret in a header *name*
  cannot be redacted: a request is refused (403 `secret_in_header`), a response field is dropped.
  Request trailers are read in `request`, response trailers in `response` (mitmproxy sends them
  after that hook, streamed responses included).
- **Reason phrase** (HTTP/1.1 responses): one holding a secret becomes the standard phrase.
- **Upgrades**: a request's `Upgrade` other than `websocket` (`h2c`, `tcp`, `SPDY/3.1`...) is
  removed with `HTTP2-Settings` and their `Connection` tokens (the upstream then answers
  plainly, which HTTP allows); a `101 Switching Protocols` that is not a WebSocket handshake
  mitmproxy would upgrade is refused (502 `upgrade_refused`), since mitmproxy would turn the
  connection into a raw relay no hook sees.
- **Transfer codings**: only `chunked` is read by mitmproxy; a message with any other coding
  (`gzip, chunked`) would pass its body on still encoded, past redaction: refused (400 / 502
  `unsupported_transfer_encoding`). A request's `TE` is cut to `trailers`, so no upstream
  answers with a transfer coding.

Header values with CR, LF or NUL are refused before any of this (ProxyHardening for requests,
`responseheaders` here for responses). Sits after WebSockets (which decides WebSocket upgrades)
and before CredentialInjection, so request rules never see the injected key. Counts per rule go
to `redaction.request_head` / `redaction.response_head` in the flow's metadata.
"""

from __future__ import annotations

import logging
from typing import Final
from urllib.parse import unquote

from mitmproxy import http

from sluicegate.config import Config
from sluicegate.mitm import flowstate, guard
from sluicegate.mitm.base import GatewayAddon
from sluicegate.mitm.routing import judged_path
from sluicegate.mitmcompat.http1_protocol import websocket_handshake
from sluicegate.redaction.headers import (
    Field,
    FieldsResult,
    path_findings,
    redact_fields,
    redact_reason,
    redacted_target,
)
from sluicegate.redaction.runtime import RedactionRuntime
from sluicegate.runtime import for_config

logger = logging.getLogger("sluicegate.parts")

CODE: Final = "redaction_error"
# Control characters that end or split a header line on HTTP/1.1 (request smuggling, response
# splitting) when an HTTP/2 peer sends them inside a value.
FORBIDDEN_IN_FIELDS: Final = (b"\r", b"\n", b"\x00")
_UPGRADE_FIELDS: Final = ("upgrade", "http2-settings")


def bad_field(fields: tuple[Field, ...] | list[Field]) -> bool:
    """Whether any name or value holds CR, LF or NUL."""
    return any(c in name or c in value for name, value in fields for c in FORBIDDEN_IN_FIELDS)


def transfer_codings(headers: http.Headers) -> list[str]:
    codings: list[str] = []
    for value in headers.get_all("transfer-encoding"):
        codings += [c.strip().lower() for c in value.split(",") if c.strip()]
    return codings


class MessageParts(GatewayAddon):
    """Eighth in the chain: after WebSockets, before CredentialInjection."""

    def __init__(self) -> None:
        self.runtime: RedactionRuntime | None = None

    def apply(self, config: Config) -> None:
        self.runtime = for_config(config)

    def _runtime(self) -> RedactionRuntime:
        assert self.runtime is not None  # the guard refuses flows while unconfigured
        return self.runtime

    # -- request ----------------------------------------------------------------------------------

    @guard.fail_closed(CODE, skip_refused=False)
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Headers redacted, path read; also on flows refused earlier, so that what is
        recorded of them (never forwarded) holds no secret either."""
        request = flow.request
        refused = flowstate.state(flow).refusal is not None
        if refused:
            _withhold_invalid(request.headers)
        else:
            codings = transfer_codings(request.headers)
            if codings and codings != ["chunked"]:
                raise _unsupported_coding("request", 400)
            _strip_upgrades(request)
            _limit_te(request)
        redactor = self._runtime().request_text_redactor(flowstate.state(flow).caller)
        if redactor is None:
            return
        result = redact_fields(request.headers.fields, redactor)
        if result.changed:
            request.headers.fields = tuple(result.fields)  # without fields named by a secret
        counts = dict(result.counts)
        if counts:
            _log(flow, "request headers", counts)
        _record(flow, "request_head", counts)
        if result.names and not refused:
            _log(flow, "request header name", result.names)
            raise guard.GatewayRefusal(
                403,
                "secret_in_header",
                f"A request header name holds what looks like a secret ({_rules(result.names)});"
                " it cannot be redacted, so the request was not forwarded.",
            )
        path, _, query = request.path.partition("?")
        decoded = unquote(path) if refused else judged_path(flow)
        found = path_findings(decoded, redactor)
        if found:
            _log(flow, "request path", found)
            # Never forwarded; recorded (and logged by mitmproxy) without the secret.
            request.path = redacted_target(decoded, query, redactor)
            if not refused:
                raise guard.GatewayRefusal(
                    403,
                    "secret_in_path",
                    f"The request path holds what looks like a secret ({_rules(found)}); a path "
                    "cannot be redacted without changing where the request goes, so it was not "
                    "forwarded. Send secrets in the body, never in the URL path.",
                )

    @guard.fail_closed(CODE)
    def request(self, flow: http.HTTPFlow) -> None:
        """Request trailers (mitmproxy sends them after this hook)."""
        trailers = flow.request.trailers
        if trailers is None:
            return
        if bad_field(trailers.fields):
            raise _invalid_field("request trailer", 400)
        redactor = self._runtime().request_text_redactor(flowstate.state(flow).caller)
        if redactor is None:
            return
        result = redact_fields(trailers.fields, redactor)
        if result.names:
            _log(flow, "request trailer name", result.names)
            trailers.fields = tuple(result.fields)
            raise guard.GatewayRefusal(
                403,
                "secret_in_header",
                f"A request trailer name holds what looks like a secret ({_rules(result.names)});"
                " it cannot be redacted, so the request was not forwarded.",
            )
        if result.changed:
            trailers.fields = tuple(result.fields)
            _log(flow, "request trailers", result.counts)
            counts = dict(flowstate.state(flow).facts.get("redaction", {}).get("request_head", {}))
            _merge(counts, result.counts)
            _record(flow, "request_head", counts)

    # -- response ---------------------------------------------------------------------------------

    @guard.fail_closed(CODE)
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            return
        if bad_field(response.headers.fields):
            raise _invalid_field("response header", 502)
        if response.status_code == 101 and not websocket_handshake(flow.request, response):
            raise guard.GatewayRefusal(
                502,
                "upgrade_refused",
                "The upstream switched protocols to something other than a WebSocket; the "
                "gateway cannot inspect that connection, so it was closed.",
                {"connection": "close"},
            )
        codings = transfer_codings(response.headers)
        if codings and codings != ["chunked"]:
            raise _unsupported_coding("response", 502)
        st = flowstate.state(flow)
        redactor = self._runtime().response_text_redactor(st.caller, st.scrub)
        counts: dict[str, int] = {}
        result = redact_fields(response.headers.fields, redactor)
        _apply(response.headers, result, counts)
        if result.names:
            _merge(counts, result.names)
        reason, found = redact_reason(response.status_code, response.reason, redactor)
        if found:
            response.reason = reason
            _merge(counts, found)
        if counts:
            _log(flow, "response head", counts)
        st.response_head = counts
        _record(flow, "response_head", counts)

    @guard.fail_closed(CODE, skip_refused=False)
    def response(self, flow: http.HTTPFlow) -> None:
        """Response trailers (sent after this hook), and the head's counts recorded again after
        the body addons wrote theirs. On refused flows: the JSON body of a refusal made while
        the response had no body (`guard.complete_answer`)."""
        guard.complete_answer(flow)
        response = flow.response
        if response is None or flowstate.state(flow).refusal is not None:
            return
        st = flowstate.state(flow)
        counts = dict(st.response_head or {})
        trailers = response.trailers
        if trailers is not None:
            if bad_field(trailers.fields):
                logger.warning(
                    "sluicegate: invalid_response_trailer: dropped the response trailers "
                    "(CR, LF or NUL in a field) [request %s]",
                    flow.id,
                )
                response.trailers = None
            else:
                redactor = self._runtime().response_text_redactor(st.caller, st.scrub)
                result = redact_fields(trailers.fields, redactor)
                _apply(trailers, result, counts)
                _merge(counts, result.names)
                if result.counts or result.names:
                    _log(flow, "response trailers", {**result.counts, **result.names})
        _record(flow, "response_head", counts)


def _withhold_invalid(headers: http.Headers) -> None:
    """Values with CR, LF or NUL (a refused request's) are not recorded as they were."""
    if bad_field(headers.fields):
        headers.fields = tuple(
            (name, b"<invalid value withheld>" if bad_field([(name, value)]) else value)
            for name, value in headers.fields
        )


def _apply(headers: http.Headers, result: FieldsResult, counts: dict[str, int]) -> None:
    if result.changed:
        headers.fields = tuple(result.fields)
    _merge(counts, result.counts)


def _merge(total: dict[str, int], counts: dict[str, int]) -> None:
    for rule, n in counts.items():
        total[rule] = total.get(rule, 0) + n


def _rules(counts: dict[str, int]) -> str:
    return ", ".join(sorted(counts))


def _log(flow: http.HTTPFlow, where: str, counts: dict[str, int]) -> None:
    logger.info(
        "sluicegate: redacted %s: %s [request %s]",
        where,
        ", ".join(f"{rule} x{n}" for rule, n in sorted(counts.items())),
        flow.id,
    )


def _record(flow: http.HTTPFlow, part: str, counts: dict[str, int]) -> None:
    section = flowstate.state(flow).facts.get("redaction") or {}
    if counts or part in section:
        flowstate.count_redactions(flow, part, counts)


def _strip_upgrades(request: http.Request) -> None:
    """Remove upgrades to anything but a WebSocket (WebSockets decided on those already)."""
    upgrade = request.headers.get_all("upgrade")
    if not upgrade or all(v.strip().lower() == "websocket" for v in upgrade):
        return
    for name in _UPGRADE_FIELDS:
        request.headers.pop(name, None)
    connection = request.headers.get_all("connection")
    if connection:
        kept = [
            token.strip()
            for value in connection
            for token in value.split(",")
            if token.strip() and token.strip().lower() not in _UPGRADE_FIELDS
        ]
        request.headers.pop("connection", None)
        if kept:
            request.headers["connection"] = ", ".join(kept)


def _limit_te(request: http.Request) -> None:
    """`TE` may only ask for trailers: a transfer coding in the answer would pass undecoded."""
    values = request.headers.get_all("te")
    if not values:
        return
    wants_trailers = any(
        token.split(";")[0].strip().lower() == "trailers"
        for value in values
        for token in value.split(",")
    )
    request.headers.pop("te", None)
    if wants_trailers:
        request.headers["te"] = "trailers"


def _invalid_field(where: str, status: int) -> guard.GatewayRefusal:
    side = "request" if status < 500 else "response"
    return guard.GatewayRefusal(
        status,
        "invalid_header",
        f"A {where} holds a line break or NUL character, which an HTTP/1.1 peer would read "
        f"as the end of the field (header injection); the {side} was not forwarded.",
    )


def _unsupported_coding(part: str, status: int) -> guard.GatewayRefusal:
    outcome = "it was not forwarded" if part == "request" else "it was withheld"
    return guard.GatewayRefusal(
        status,
        "unsupported_transfer_encoding",
        f"The {part} uses a transfer coding other than chunked (such as gzip); the gateway "
        f"inspects only bodies it can read, so {outcome}.",
    )
