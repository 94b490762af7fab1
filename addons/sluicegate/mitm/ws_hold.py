"""WebSocket messages held back until the next message decides them (the WebSockets addon's
stream step; the engine is `redaction/messages.py`).

mitmproxy relays a message as soon as the `websocket_message` hook returns, and cannot delay it.
So a message that must wait is dropped from the live flow (the recording keeps it as a
`[sluicegate:held]` marker) and, once the stream releases it, injected into the flow again
(`inject.websocket`), in order: while earlier messages wait or are being injected, a decided
message is injected behind them too. Injected messages come back through the hook; the ones the
gateway injected (`HeldDirection.injected`, compared in order) pass as they are, already read.
Each released message is checked first (`Check`: the request rules for client messages, the
response rules for server messages); a refusal ends the release there.

A held message is released `websockets.hold_seconds` after the last message of its direction if
nothing decided it sooner (`expire`, from a timer), or when either side closes (`release_all`,
from the `websocket_closing` hook of mitmcompat/websocket_closing.py): then what waits, the
injected messages mitmproxy has not relayed yet included, is sent ahead of the close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final, Literal

from mitmproxy import ctx, http
from mitmproxy.websocket import WebSocketMessage

from sluicegate.mitm.flowstate import HeldDirection, WebSocketChannel
from sluicegate.redaction.messages import MessageStream, Outcome
from sluicegate.redaction.redactor import Redactor

logger = logging.getLogger("sluicegate.websockets")

HELD_MARKER: Final = b"[sluicegate:held]"

# (flow, from_client, text) -> the code to close with, or None when the message may pass.
Check = Callable[[http.HTTPFlow, bool, str], str | None]
# (content, is_text): a released message, sent towards the other side.
Send = Callable[[bytes, bool], None]


def direction(
    channel: WebSocketChannel,
    from_client: bool,
    redactor: Redactor,
    redact: Callable[[str], str],
    *,
    max_messages: int,
    max_bytes: int,
    overflow: Literal["close", "release"],
) -> HeldDirection:
    hold = channel.holds.get(from_client)
    if hold is None:
        stream = MessageStream(
            redactor,
            redact=redact,
            max_messages=max_messages,
            max_bytes=max_bytes,
            overflow=overflow,
        )
        hold = channel.holds[from_client] = HeldDirection(stream)
    return hold


def take_injected(channel: WebSocketChannel, message: WebSocketMessage) -> bool:
    """Whether `message` is one the gateway injected (released after waiting): it passes."""
    hold = channel.holds.get(message.from_client)
    if not message.injected or hold is None or not hold.injected:
        return False
    if hold.injected[0][0] != message.content:
        return False
    hold.injected.popleft()
    return True


def arrive(
    flow: http.HTTPFlow, message: WebSocketMessage, raw: str, hold: HeldDirection, check: Check
) -> str | None:
    """Read a text message into its direction's stream (`raw`: as it arrived; `message` holds
    it redacted whole); the code to close with."""
    outcome = hold.stream.push(raw, message.text, len(raw.encode()))
    return _apply(flow, hold, message.from_client, outcome, message, check)


def expire(flow: http.HTTPFlow, hold: HeldDirection, from_client: bool, check: Check) -> str | None:
    """Release every waiting message with what is known (the timer fired)."""
    return _apply(flow, hold, from_client, hold.stream.flush(), None, check)


def release_all(
    flow: http.HTTPFlow, hold: HeldDirection, from_client: bool, check: Check, send: Send
) -> str | None:
    """The connection is closing: everything waiting goes to `send`, in order. First what was
    injected and not relayed yet (checked already), then every held message released with what
    is known, checked, exactly as `expire` releases them; the code of a failure (what failed and
    everything after it is not sent)."""
    while hold.injected:
        content, is_text = hold.injected.popleft()
        send(content, is_text)
    return _apply(flow, hold, from_client, hold.stream.flush(), None, check, send)


def behind(
    flow: http.HTTPFlow, message: WebSocketMessage, hold: HeldDirection, check: Check
) -> str | None:
    """A message the stream does not read (binary, passed): it must not overtake the messages
    before it, so they are released first and it is injected behind them."""
    if not hold.stream.pending and not hold.injected:
        return None
    failure = expire(flow, hold, message.from_client, check)
    if failure is not None:
        return failure
    content = message.content
    _hold_back(message)
    _inject(flow, hold, message.from_client, content, is_text=message.is_text)
    return None


def arm(hold: HeldDirection, seconds: float, callback: Callable[[], None]) -> None:
    """(Re)start the hold timer: `callback` runs `seconds` after the last message."""
    if hold.timer is not None:
        hold.timer.cancel()
        hold.timer = None
    if hold.stream.pending:
        hold.timer = asyncio.get_running_loop().call_later(seconds, callback)


def stop(channel: WebSocketChannel) -> None:
    """The connection is closing or ended: no timer fires any more (`release_all` sends what
    waits ahead of the close)."""
    for hold in channel.holds.values():
        if hold.timer is not None:
            hold.timer.cancel()
            hold.timer = None


def _apply(
    flow: http.HTTPFlow,
    hold: HeldDirection,
    from_client: bool,
    outcome: Outcome,
    current: WebSocketMessage | None,
    check: Check,
    send: Send | None = None,
) -> str | None:
    if outcome.failure is not None:
        return outcome.failure
    released = outcome.released
    failure = None
    for index, item in enumerate(released):
        failure = check(flow, from_client, item.text)
        if failure is not None:
            released = released[:index]
            break
    if (
        current is not None
        and failure is None
        and not hold.injected
        and len(released) == 1
        and not released[0].waited
    ):
        if released[0].text != current.text:
            current.text = released[0].text
        return None  # passes live, as it arrived
    if current is not None:
        _hold_back(current)
    for item in released:
        if send is not None:
            send(item.text.encode(), True)
        else:
            _inject(flow, hold, from_client, item.text.encode(), is_text=True)
    return failure


def _hold_back(message: WebSocketMessage) -> None:
    message.drop()
    message.content = HELD_MARKER


def _inject(
    flow: http.HTTPFlow, hold: HeldDirection, from_client: bool, content: bytes, *, is_text: bool
) -> None:
    hold.injected.append((content, is_text))
    ctx.master.commands.call("inject.websocket", flow, not from_client, content, is_text)
