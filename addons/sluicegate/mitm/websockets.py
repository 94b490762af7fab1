"""WebSockets: an upgraded connection is no unredacted side channel (chain position 7).

mitmproxy relays WebSocket upgrades by default, and once the 101 is through no HTTP hook sees the
messages: without this addon they would pass unredacted. So an upgrade is refused (403
`websocket_blocked`) before anything reaches the upstream unless its route is listed in
`websockets.routes`. The upgrade request itself went through auth, routing, policy and credential
injection like any request (this addon sits before CredentialInjection).

On an allowed route every message is redacted with the same engine as bodies, one message at a
time: text messages as JSON (or text) in both directions, server messages also with the flow's
scrub literals (every encoding of the injected credential, the caller's token). Binary messages
cannot be redacted: `binary: block` drops them and closes the connection with 1008 (policy
violation); `pass` forwards them. A message the gateway cannot handle (a redaction error, a
message over `gateway.max_body_bytes`, any exception) is dropped and the connection closed
(1011 / 1009 / 1008); nothing is forwarded after that. Dropped messages keep a marker instead of
their content, so the recording (written at `websocket_end` by the Recorder) holds the redacted
messages and no original.

Text messages of one direction are also read as one stream (`ws_hold.py` over
`redaction/messages.py`), so a secret split across messages is found: a message whose end could
still become a secret is held until the next message decides it (or `websockets.hold_seconds`
pass), a split secret closes the connection (1008 `websocket_secret_split`) before any part of it
left, and more than `hold_messages` / `hold_bytes` waiting releases what waits or closes it
(1009 `websocket_hold_overflow`), per `hold_overflow`. Released messages are checked by the
policy first: client messages by the request rules with body conditions, server messages by the
response rules (1008 `policy_blocked`, the rule recorded). When either side closes, what waits is
released the same way and sent before the close (`websocket_closing`, a hook added by
mitmcompat/websocket_closing.py); what cannot be sent is logged and counted (`websocket_held_lost`).

mitmproxy has no API to close a WebSocket from an addon (mitmproxy#4773). `close_websocket`
queues a close on the flow's WebsocketLayer and wakes it with an injected, dropped message; when
that is impossible (no live layer) the flow stays marked closed and every later message is dropped.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, Final

from mitmproxy import http
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import CloseReason

from sluicegate.config import Config, WebSocketsSection
from sluicegate.mitm import flowstate, guard, ws_hold
from sluicegate.mitm.base import GatewayAddon
from sluicegate.mitm.policy import flow_context
from sluicegate.mitmcompat import websocket_closing
from sluicegate.mitmcompat.websocket_close import close_websocket
from sluicegate.mitmcompat.websocket_closing import Closing
from sluicegate.policy.decisions import Action
from sluicegate.policy.engine import Policy
from sluicegate.policy.views import BodyViews
from sluicegate.redaction import messages
from sluicegate.redaction.bodies import BodyPolicy, BodyRefused, redact_body
from sluicegate.redaction.redactor import Redactor, StreamTooSlow
from sluicegate.redaction.runtime import RedactionRuntime
from sluicegate.runtime import build_policy, for_config
from sluicegate.shapes.events import MessageReader

logger = logging.getLogger("sluicegate.websockets")

ERROR_CODE: Final = "websocket_error"
BLOCKED_CODE: Final = "websocket_blocked"
BINARY_BLOCKED: Final = "websocket_binary_blocked"
TOO_LARGE: Final = "websocket_message_too_large"
POLICY_CODE: Final = "policy_blocked"
# Held messages not delivered when a side closed (logged with the cause: a check's code, or
# HELD_UNDELIVERABLE when the receiver's connection was gone).
HELD_LOST: Final = "websocket_held_lost"
HELD_UNDELIVERABLE: Final = "websocket_receiver_gone"
FAULT_POINT: Final = "WebSockets.websocket_message"
# Text messages are JSON or text whatever the upgrade's content type said.
TEXT_POLICY: Final = BodyPolicy(binary="block", unknown="text")
# Larger messages are redacted on a worker thread (the regex module releases the GIL).
THREAD_BYTES: Final = 256 * 1024
CLOSE_CODES: Final = {
    BINARY_BLOCKED: CloseReason.POLICY_VIOLATION,
    TOO_LARGE: CloseReason.MESSAGE_TOO_BIG,
    ERROR_CODE: CloseReason.INTERNAL_ERROR,
    StreamTooSlow.code: CloseReason.INTERNAL_ERROR,
    messages.SPLIT: CloseReason.POLICY_VIOLATION,
    messages.OVERFLOW: CloseReason.MESSAGE_TOO_BIG,
}
# Request headers only a WebSocket handshake sends (mitmproxy upgrades on Sec-WebSocket-Version).
_HANDSHAKE_HEADERS: Final = ("sec-websocket-key", "sec-websocket-version")


Channel = flowstate.WebSocketChannel


def is_upgrade_request(request: http.Request) -> bool:
    """Whether the request asks for a WebSocket, by any of the headers an upgrade needs."""
    upgrade = request.headers.get_all("upgrade")
    if any("websocket" in value.lower() for value in upgrade):
        return True
    return any(name in request.headers for name in _HANDSHAKE_HEADERS)


class MessageFailed(Exception):
    """The current message must not pass: drop it and close the connection with `code`."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


MessageHook = Callable[["WebSockets", http.HTTPFlow, WebSocketMessage, Channel], Awaitable[None]]


def message_fail_closed(fn: MessageHook) -> Callable[[WebSockets, http.HTTPFlow], Awaitable[None]]:
    """The guard of `websocket_message`: an exception drops the message and closes the connection.

    `guard.fail_closed` answers with an HTTP error, which means nothing once the connection is
    upgraded; here the message is dropped instead (its content replaced by a marker) and the
    connection closed. Once closed, every further message is dropped.
    """

    @functools.wraps(fn)
    async def wrapper(self: WebSockets, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        channel = _channel(flow)
        if channel.closed is not None:
            _drop(message, channel, channel.closed)
            flowstate.record(flow, "websocket", channel.facts())
            return
        if ws_hold.take_injected(channel, message):
            return  # released after waiting: read when it arrived
        channel.messages += 1
        try:
            if self.config is None:
                raise MessageFailed("gateway_not_configured")
            if guard.fault_injector is not None:
                guard.fault_injector(FAULT_POINT, flow)
            await fn(self, flow, message, channel)
        except (MessageFailed, StreamTooSlow) as exc:
            logger.warning(
                "sluicegate: %s: dropped a %s message and closed the WebSocket [request %s]",
                exc.code,
                "client" if message.from_client else "server",
                flow.id,
            )
            _fail(flow, message, channel, exc.code)
        except Exception as exc:
            # Never the exception text: it may carry message data.
            where = "; ".join(
                f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"
                for frame in traceback.extract_tb(exc.__traceback__)[-4:]
            )
            logger.error(
                "sluicegate: %s: hook raised %s in WebSockets.websocket_message [request %s] at %s",
                ERROR_CODE,
                type(exc).__name__,
                flow.id,
                where,
            )
            _fail(flow, message, channel, ERROR_CODE)
        flowstate.record(flow, "websocket", channel.facts())

    return wrapper


class WebSockets(GatewayAddon):
    """Seventh in the chain: after StreamRedaction, before CredentialInjection."""

    def __init__(self) -> None:
        self.settings = WebSocketsSection()
        self.runtime: RedactionRuntime | None = None
        self.policy: Policy | None = None

    def apply(self, config: Config) -> None:
        self.runtime = for_config(config)
        self.settings = config.websockets
        self.policy = build_policy(config.policy)

    def allowed(self, flow: http.HTTPFlow) -> bool:
        route = flowstate.state(flow).route
        return route is not None and route in self.settings.routes

    @guard.fail_closed(ERROR_CODE)
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if is_upgrade_request(flow.request) and not self.allowed(flow):
            raise _blocked()

    @guard.fail_closed(ERROR_CODE, skip_refused=False)
    def response(self, flow: http.HTTPFlow) -> None:
        """An upgrade the request did not announce is refused too (mitmproxy decides by the 101).

        Runs on refused flows as well: a 101 another addon replaced by an error upgrades nothing,
        and the Recorder must record it as a response (it leaves WebSocket flows to their end).
        """
        if flow.websocket is None:
            return
        refused = flowstate.state(flow).refusal is not None
        if refused or flow.response is None or flow.response.status_code != 101:
            flow.websocket = None
            return
        if not self.allowed(flow):
            flow.websocket = None  # no WebSocket layer: the refusal is an ordinary response
            raise _blocked()
        st = flowstate.state(flow)
        st.websocket = Channel(st.route)
        flowstate.record(flow, "websocket", st.websocket.facts())

    @message_fail_closed
    async def websocket_message(
        self, flow: http.HTTPFlow, message: WebSocketMessage, channel: Channel
    ) -> None:
        runtime = self.runtime
        assert runtime is not None
        if len(message.content) > runtime.max_body_bytes:
            raise MessageFailed(TOO_LARGE)
        if not message.is_text:
            if self.settings.binary == "block":
                raise MessageFailed(BINARY_BLOCKED)
            hold = channel.holds.get(message.from_client)
            if hold is not None:
                failure = ws_hold.behind(flow, message, hold, self._check)
                if failure is not None:
                    raise MessageFailed(failure)
            return
        side = "client" if message.from_client else "server"
        if message.from_client:
            redactor = runtime.request
        else:
            if channel.response_redactor is None:
                channel.response_redactor = runtime.for_response(flowstate.state(flow).scrub)
            redactor = channel.response_redactor
        if redactor is None:  # redaction.requests: false
            if self._check(flow, True, message.text) is not None:
                raise MessageFailed(POLICY_CODE)
            return
        raw = message.text
        try:
            result = await _off_loop(
                len(message.content), redact_body, message.content, None, redactor, TEXT_POLICY
            )
        except BodyRefused as exc:
            raise MessageFailed(exc.code) from None
        if result.changed:
            message.content = result.body
        counts = channel.counts[side]
        for rule, n in result.counts.items():
            counts[rule] = counts.get(rule, 0) + n
        hold = ws_hold.direction(
            channel,
            message.from_client,
            redactor,
            functools.partial(_redact_text, redactor),
            max_messages=self.settings.hold_messages,
            max_bytes=self.settings.hold_bytes,
            overflow=self.settings.hold_overflow,
        )
        failure = ws_hold.arrive(flow, message, raw, hold, self._check)
        if failure is not None:
            raise MessageFailed(failure)
        from_client = message.from_client
        ws_hold.arm(hold, self.settings.hold_seconds, lambda: self._expired(flow, from_client))

    def websocket_closing(self, flow: http.HTTPFlow) -> None:
        """Either side closed: what waits is sent ahead of the close, released as the hold timer
        releases it (mitmcompat/websocket_closing.py fires this before mitmproxy relays a close).

        Fail closed: what a check refuses, and everything after it, is dropped; what cannot reach
        its receiver any more (its connection dropped) is dropped. Either is logged and recorded
        (`held.<side>.lost_at_close`, `lost_code`), never with the text. After the gateway closed
        the connection itself nothing is released."""
        st = flowstate.peek(flow)
        channel = st.websocket if st is not None else None
        closing = websocket_closing.closing(flow)
        if channel is None or closing is None:
            return
        ws_hold.stop(channel)
        for from_client in (closing.closed_by_client, not closing.closed_by_client):
            hold = channel.holds.get(from_client)
            if hold is not None:
                self._release_at_close(flow, channel, hold, from_client, closing)
        flowstate.record(flow, "websocket", channel.facts())

    def _release_at_close(
        self,
        flow: http.HTTPFlow,
        channel: Channel,
        hold: flowstate.HeldDirection,
        from_client: bool,
        closing: Closing,
    ) -> None:
        waiting = len(hold.injected) + hold.stream.pending
        if not waiting:
            return
        sent = 0

        def send(content: bytes, is_text: bool) -> None:
            nonlocal sent
            if closing.send(from_client, content, is_text=is_text):
                sent += 1

        if channel.closed is not None:
            failure: str | None = channel.closed  # the gateway closed it: nothing more passes
        elif not closing.deliverable.get(from_client, False):
            failure = HELD_UNDELIVERABLE
        else:
            try:
                failure = ws_hold.release_all(flow, hold, from_client, self._check, send)
            except Exception as exc:
                logger.error(
                    "sluicegate: %s: releasing held messages at close raised %s [request %s]",
                    ERROR_CODE,
                    type(exc).__name__,
                    flow.id,
                )
                failure = ERROR_CODE
            if failure is None and sent < waiting:
                failure = HELD_UNDELIVERABLE
        hold.injected.clear()
        hold.released_at_close += sent
        lost = waiting - sent
        if lost <= 0:
            return
        hold.lost_at_close += lost
        hold.lost_code = failure
        if channel.closed is None:
            logger.warning(
                "sluicegate: %s: %d held %s message(s) dropped when the %s closed (%s) "
                "[request %s]",
                HELD_LOST,
                lost,
                "client" if from_client else "server",
                "client" if closing.closed_by_client else "server",
                failure,
                flow.id,
            )

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        """No hold timer outlives the connection (what waited was released at the close, by
        `websocket_closing`)."""
        channel = flowstate.state(flow).websocket
        if channel is not None:
            ws_hold.stop(channel)
            flowstate.record(flow, "websocket", channel.facts())

    def _expired(self, flow: http.HTTPFlow, from_client: bool) -> None:
        """The hold timer: release what waits, with what is known; fail closed."""
        channel = flowstate.state(flow).websocket
        if channel is None or channel.closed is not None or not flow.live:
            return
        hold = channel.holds[from_client]
        hold.timer = None
        try:
            failure = ws_hold.expire(flow, hold, from_client, self._check)
        except Exception as exc:
            logger.error(
                "sluicegate: %s: hold timer raised %s [request %s]",
                ERROR_CODE,
                type(exc).__name__,
                flow.id,
            )
            failure = ERROR_CODE
        if failure is not None:
            logger.warning(
                "sluicegate: %s: closed the WebSocket after held messages [request %s]",
                failure,
                flow.id,
            )
            channel.closed = failure
            close_websocket(flow, CLOSE_CODES.get(failure, CloseReason.POLICY_VIOLATION), failure)
        flowstate.record(flow, "websocket", channel.facts())

    def _check(self, flow: http.HTTPFlow, from_client: bool, text: str) -> str | None:
        """A message about to be released, checked by the policy: the close code, or None."""
        channel = _channel(flow)
        if from_client:
            return self._check_request_rules(flow, text, channel)
        return self._check_response_rules(flow, text, channel)

    def _check_request_rules(self, flow: http.HTTPFlow, text: str, channel: Channel) -> str | None:
        """Client messages are requests' bodies to the request rules with body conditions
        (rules without them decided the upgrade already); any action but allow closes (1008):
        a message cannot wait for an approver or be rewritten."""
        policy = self.policy
        if policy is None or not any(r.when.needs_body for r in policy.request_rules):
            return None
        decision = policy.decide_request(flow_context(flow), BodyViews.of(text.encode()))
        if decision.is_default or not policy.rule(decision.rule_id).when.needs_body:
            return None
        if decision.action is Action.ALLOW:
            return None
        channel.policy_rule = decision.rule_id
        return POLICY_CODE

    @staticmethod
    def _check_response_rules(flow: http.HTTPFlow, text: str, channel: Channel) -> str | None:
        """Server messages are a stream: the flow's response rules read them as they read an SSE
        stream (one scanner across the connection's messages, so a command split over messages
        is still found), after redaction; a match drops the message and closes (1008)."""
        response_policy = flowstate.state(flow).response_policy
        if response_policy is None:
            return None
        if channel.scanner is None:
            channel.scanner = response_policy.stream()
            channel.reader = MessageReader()
            if channel.scanner.feed("") is not None:
                return POLICY_CODE
        assert channel.reader is not None
        # A known event shape: its text channels, joined across messages (as for SSE).
        generated = channel.reader.read(text)
        if generated:
            if channel.scanner.feed(generated) is not None:
                return POLICY_CODE
            return None
        # Any other message on its own: its raw text and its decoded JSON strings.
        if response_policy.scan_views(BodyViews.of(text.encode())) is not None:
            channel.scanner.decision = response_policy.stream_decisions[-1]
            return POLICY_CODE
        return None


def _redact_text(redactor: Redactor, text: str) -> str:
    """A message rebuilt with a stream's tags, redacted whole again as it was the first time."""
    return redact_body(text.encode(), None, redactor, TEXT_POLICY).body.decode()


def _blocked() -> guard.GatewayRefusal:
    return guard.GatewayRefusal(
        403,
        BLOCKED_CODE,
        "WebSocket connections are not allowed on this route (their messages would bypass "
        "redaction); nothing was forwarded.",
    )


def _channel(flow: http.HTTPFlow) -> Channel:
    st = flowstate.state(flow)
    channel = st.websocket
    if channel is None:  # the upgrade bypassed `response`: treat as unknown
        channel = st.websocket = Channel(st.route)
    return channel


def _drop(message: WebSocketMessage, channel: Channel, code: str) -> None:
    """Drop `message` and keep a marker instead of its content (recordings never hold it)."""
    message.drop()
    message.content = f"[sluicegate:dropped:{code}]".encode()
    channel.dropped += 1


def _fail(flow: http.HTTPFlow, message: WebSocketMessage, channel: Channel, code: str) -> None:
    _drop(message, channel, code)
    channel.closed = code
    close_code = CLOSE_CODES.get(code, CloseReason.POLICY_VIOLATION)
    if not close_websocket(flow, close_code, code):
        logger.error(
            "sluicegate: cannot close the WebSocket; every further message is dropped [request %s]",
            flow.id,
        )


async def _off_loop(size: int, fn: Callable[..., Any], *args: object) -> Any:
    if size > THREAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)
