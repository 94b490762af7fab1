"""Failing closed: the shared guard around every security hook.

mitmproxy's default is fail-open: when an addon hook raises, it logs "Addon error" and forwards the
flow. For a gateway that injects credentials and redacts secrets that is the wrong way round, so
every security hook is wrapped by `fail_closed`: an exception answers the flow with a JSON error
(5xx, stable `code`, the request id, no internals, no secret), logs the code and where it happened
(exception type and code locations, never the exception text, which may carry data), and nothing
is forwarded.

Expected refusals (bad token, blocked by policy, body too large) are raised as `GatewayRefusal`
and answered the same way with their own status and code.
"""

from __future__ import annotations

import asyncio
import functools
import http
import json
import logging
import traceback
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from mitmproxy import ctx
from mitmproxy import http as mhttp

from sluicegate.mitm import flowstate

logger = logging.getLogger("sluicegate.guard")

REQUEST_ID_HEADER = "x-sluicegate-request-id"
REQUEST_PHASE_HOOKS = frozenset({"http_connect", "requestheaders", "request"})


class GatewayRefusal(Exception):
    """An expected refusal: answer the flow with `status` and a JSON body naming `code`.

    `message` is shown to the agent: it must be safe (no token, no secret, no matched value).
    """

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_body(code: str, message: str, request_id: str) -> bytes:
    """The JSON error body. The shape follows OpenAI's (`error.message`), so SDKs surface it."""
    return json.dumps(
        {
            "error": {
                "code": code,
                "message": message,
                "type": "sluicegate_error",
                "request_id": request_id,
            }
        }
    ).encode()


def answer(
    flow: mhttp.HTTPFlow,
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    *,
    phase: str = "request",
) -> None:
    """Answer `flow` with a JSON error so that nothing (more) is forwarded.

    Before the request is sent upstream we set a response, so mitmproxy never connects. Once the
    upstream response headers have arrived (`responseheaders`) we rewrite status and headers and
    discard the upstream body, sending our error body at the end instead.
    """
    st = flowstate.state(flow)
    st.refusal = flowstate.Refusal(status=status, code=code, message=message, phase=phase)
    body = error_body(code, message, st.request_id)
    fields = {
        "content-type": "application/json",
        "cache-control": "no-store",
        REQUEST_ID_HEADER: st.request_id,
        **dict(headers or {}),
    }
    if phase == "responseheaders" and flow.response is not None:
        response = flow.response
        response.status_code = status
        response.reason = _reason(status)
        response.headers = mhttp.Headers(
            [(k.encode(), v.encode()) for k, v in fields.items()]
            + [(b"content-length", str(len(body)).encode())]
        )
        response.stream = _discard_then(body)
        # A response that ends with its head (101, 204, HEAD, content-length 0) never reaches
        # the stream function: `complete_answer` puts the body in place in `response`.
        st.pending_answer = body
    else:
        flow.response = mhttp.Response.make(status, body, fields)
    flowstate.publish(flow)


def complete_answer(flow: mhttp.HTTPFlow) -> None:
    """In the `response` hook: the JSON body of a refusal made in `responseheaders` whose
    upstream response had no body to replace (else the client would wait for the declared
    content-length forever). Streamed bodies got it from the stream function already."""
    st = flowstate.peek(flow)
    body = st.pending_answer if st is not None else None
    if st is not None:
        st.pending_answer = None
    response = flow.response
    if isinstance(body, bytes) and response is not None and response.raw_content == b"":
        response.content = body


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _discard_then(body: bytes) -> Callable[[bytes], bytes | list[bytes]]:
    """A stream function that drops the upstream body and sends `body` at end of message."""

    def stream(chunk: bytes) -> bytes | list[bytes]:
        # Never return b"" mid-stream: on HTTP/1.1 an empty chunk ends the chunked body.
        return body if chunk == b"" else []

    return stream


F = TypeVar("F", bound=Callable[..., Any])

# Test seam: when set (only ever by a test script loaded into mitmdump), called as
# `fault_injector("Class.hook", flow)` inside every guarded hook, so tests can make any hook raise
# and prove the real wrapper fails the flow closed. None in production.
fault_injector: Callable[[str, Any], None] | None = None


def fail_closed(code: str, *, status: int = 500, skip_refused: bool = True) -> Callable[[F], F]:
    """Wrap a flow hook so any exception answers the flow with error `code` instead of passing it.

    `skip_refused`: do not run the hook on a flow the gateway already answered (mitmproxy still
    calls later addons' hooks after one of them has set a response).
    """

    def decorate(fn: F) -> F:
        hook = fn.__name__
        phase = "request" if hook in REQUEST_PHASE_HOOKS else hook

        def handle(self: Any, flow: mhttp.HTTPFlow, exc: BaseException) -> None:
            if isinstance(exc, GatewayRefusal):
                logger.info(
                    "sluicegate: refused %s (%s) in %s.%s [request %s]",
                    exc.code,
                    exc.status,
                    type(self).__name__,
                    hook,
                    flow.id,
                )
                answer(flow, exc.status, exc.code, exc.message, exc.headers, phase=phase)
                return
            where = "; ".join(
                f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"
                for frame in traceback.extract_tb(exc.__traceback__)[-4:]
            )
            logger.error(
                "sluicegate: %s: %s raised %s in %s.%s [request %s] at %s",
                code,
                "hook",
                type(exc).__name__,
                type(self).__name__,
                hook,
                flow.id,
                where,
            )
            answer(
                flow,
                status,
                code,
                "The gateway could not process this request safely, so it was not forwarded.",
                phase=phase,
            )

        def should_skip(flow: mhttp.HTTPFlow) -> bool:
            st = flowstate.peek(flow)
            return skip_refused and st is not None and st.refusal is not None

        if asyncio.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(self: Any, flow: mhttp.HTTPFlow) -> Any:
                if should_skip(flow):
                    return None
                try:
                    _ensure_configured(self)
                    if fault_injector is not None:
                        fault_injector(f"{type(self).__name__}.{hook}", flow)
                    return await fn(self, flow)
                except Exception as e:
                    handle(self, flow, e)
                    return None

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(self: Any, flow: mhttp.HTTPFlow) -> Any:
            if should_skip(flow):
                return None
            try:
                _ensure_configured(self)
                if fault_injector is not None:
                    fault_injector(f"{type(self).__name__}.{hook}", flow)
                return fn(self, flow)
            except Exception as e:
                handle(self, flow, e)
                return None

        return wrapper  # type: ignore[return-value]

    return decorate


def _ensure_configured(addon: Any) -> None:
    """Gateway addons without a valid config refuse every flow (see `GatewayAddon`)."""
    if getattr(addon, "config", True) is None:
        raise GatewayRefusal(
            503,
            "gateway_not_configured",
            "The gateway has no valid configuration; nothing is forwarded.",
        )


# Live sluicegate addons. The package module survives `-s` script reloads, so this registry tells
# the ChainSentinel whether a working chain is currently loaded.
_live: weakref.WeakSet[Any] = weakref.WeakSet()


def register_live(addon: Any) -> None:
    _live.add(addon)


def unregister_live(addon: Any) -> None:
    _live.discard(addon)


def chain_is_live() -> bool:
    return len(_live) > 0


class ChainSentinel:
    """Refuses all traffic while no sluicegate addon is loaded.

    mitmproxy unloads a script's addons before loading its new version; if the new version fails
    to load (a syntax error during hot reload, a removed `-s`), the proxy would otherwise keep
    running as a plain, fail-open proxy. The sentinel is registered on the master itself, not
    inside the script, so it stays when the script goes.
    """

    name = "sluicegate-sentinel"

    @staticmethod
    def install() -> None:
        if ctx.master.addons.get(ChainSentinel.name) is None:
            ctx.master.addons.add(ChainSentinel())

    def http_connect(self, flow: mhttp.HTTPFlow) -> None:
        self._check(flow)

    def requestheaders(self, flow: mhttp.HTTPFlow) -> None:
        self._check(flow)

    def request(self, flow: mhttp.HTTPFlow) -> None:
        self._check(flow)

    def _check(self, flow: mhttp.HTTPFlow) -> None:
        if not chain_is_live() and flow.response is None:
            logger.error("sluicegate: no gateway chain is loaded; refusing %s", flow.id)
            answer(
                flow,
                503,
                "gateway_not_loaded",
                "The gateway's security chain is not loaded; nothing is forwarded.",
            )

    def tcp_start(self, flow: Any) -> None:
        # Raw TCP (non-HTTP inside a tunnel) cannot be authenticated, redacted or recorded.
        logger.warning("sluicegate: closing raw TCP flow %s: not HTTP", flow.id)
        flow.kill()

    def udp_start(self, flow: Any) -> None:
        logger.warning("sluicegate: closing raw UDP flow %s: not HTTP", flow.id)
        flow.kill()
