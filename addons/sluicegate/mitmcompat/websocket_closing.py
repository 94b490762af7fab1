"""A hook before mitmproxy relays a WebSocket close, and a way to send messages ahead of it.

mitmproxy's WebsocketLayer (`relay_messages`, identical in 11.0.x and 12.x) handles a close
frame (or a dropped connection, read as close 1006) the moment wsproto parses it: it sends the
close to both peers, closes both connections, fires `websocket_end` and stops relaying. No hook
runs before that, and a message injected then (`inject.websocket`) reaches a finished layer and
is dropped. The WebSockets addon holds back messages whose end could still become a secret, so
without this patch a close loses them.

This patch wraps `WebsocketLayer.relay_messages`. While mitmproxy's code reads the source side's
wsproto events, the first `CloseConnection` is taken out (the messages before it are relayed as
usual); then `websocket_closing(flow)` runs (`WebsocketClosingHook`, blocking); the messages
an addon gave `closing(flow).send` are sent, in order, and added to `flow.websocket.messages`
(marked injected); then the close goes back to mitmproxy's code, which relays it as before.

A message goes to its receiver while that side's wsproto connection is OPEN, or REMOTE_CLOSING
(the receiver is the side that closed: RFC 6455 5.5.1 lets the other end send data before its
Close answer; wsproto's `send` refuses, so the frames come from its frame protocol directly).
A receiver whose connection dropped (CLOSED) gets nothing: `closing.send` says False.

Internals touched (tests/unit/test_mitmcompat.py): `WebsocketLayer.relay_messages(self, event)`
and its attributes `flow`, `context`, `client_ws`, `server_ws`; that it reads the source's
events with `src_ws.events()` and feeds data with `src_ws.receive_data`;
`WebsocketConnection.send2`, `.conn`, wsproto's `Connection._events`, `._proto.send_data` and
`.state`; `Fragmentizer(fragments, is_text)`.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Generator, Iterator
from typing import Any, Final

import wsproto.events
from mitmproxy import http
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import websocket as ws_layer
from mitmproxy.websocket import WebSocketMessage
from wsproto import ConnectionState
from wsproto.frame_protocol import Opcode

from sluicegate import mitmcompat

_MARK: Final = "_sluicegate_closing"
# Receivers that can still be sent a message (see the module docstring).
_OPEN: Final = frozenset({ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING})

Relay = Callable[[Any, events.Event], Generator[commands.Command, Any, None]]


@dataclasses.dataclass
class Closing:
    """A close about to be relayed: who closed, and what may still be sent before it."""

    closed_by_client: bool
    code: int
    # from_client -> whether a message from that side can still reach the other side.
    deliverable: dict[bool, bool]
    queued: list[tuple[bool, bytes, bool]] = dataclasses.field(default_factory=list)

    def send(self, from_client: bool, content: bytes, *, is_text: bool = True) -> bool:
        """Send `content` (from that side, to the other) before the close; False when its
        receiver is gone (nothing is kept)."""
        if not self.deliverable.get(from_client, False):
            return False
        self.queued.append((from_client, content, is_text))
        return True


@dataclasses.dataclass
class WebsocketClosingHook(commands.StartHook):
    """Either side of a WebSocket closed (or its connection dropped: code 1006). The close is
    relayed when the hook returns; messages given to `closing(flow).send` are sent before it.
    (mitmproxy's connection handler passes hooks a single argument: the flow.)"""

    flow: http.HTTPFlow


# The close each flow's hook is about to relay (only while the hook runs).
_closing: weakref.WeakKeyDictionary[http.HTTPFlow, Closing] = weakref.WeakKeyDictionary()


def closing(flow: http.HTTPFlow) -> Closing | None:
    """The close about to be relayed on `flow` (inside `websocket_closing`), else None."""
    return _closing.get(flow)


def _source(layer: Any, event: events.Event) -> Any:
    """The wsproto connection `relay_messages` reads for `event` (as it decides it)."""
    if isinstance(event, events.ConnectionEvent):
        from_client = event.connection == layer.context.client
    elif isinstance(event, ws_layer.WebSocketMessageInjected):
        from_client = event.message.from_client
    else:
        return None
    return layer.client_ws if from_client else layer.server_ws


def _send(layer: Any, from_client: bool, content: bytes, is_text: bool) -> Iterator[Any]:
    target = layer.server_ws if from_client else layer.client_ws
    if target.state not in _OPEN:
        return
    kind = Opcode.TEXT if is_text else Opcode.BINARY
    layer.flow.websocket.messages.append(
        WebSocketMessage(kind, from_client, content, injected=True)
    )
    for frame in ws_layer.Fragmentizer([], is_text)(content):
        if target.state is ConnectionState.OPEN:
            yield target.send2(frame)
        else:  # the receiver closed: data may still precede our Close answer
            data = target._proto.send_data(frame.data, frame.message_finished)
            yield commands.SendData(target.conn, data)


def _closing_relay(relay: Relay) -> Relay:
    @functools.wraps(relay)
    def wrapper(self: Any, event: events.Event) -> Generator[commands.Command, Any, None]:
        src_ws = _source(self, event)
        if src_ws is None:
            yield from relay(self, event)
            return
        stopped: list[wsproto.events.CloseConnection] = []

        def until_close() -> Iterator[wsproto.events.Event]:
            for ws_event in type(src_ws).events(src_ws):
                if isinstance(ws_event, wsproto.events.CloseConnection):
                    stopped.append(ws_event)
                    return
                yield ws_event

        src_ws.events = until_close
        try:
            yield from relay(self, event)
        finally:
            del src_ws.events
        if not stopped:
            return
        close = stopped[0]
        from_client = src_ws is self.client_ws
        pending = Closing(
            closed_by_client=from_client,
            code=close.code,
            deliverable={
                True: self.server_ws.state in _OPEN,
                False: self.client_ws.state in _OPEN,
            },
        )
        _closing[self.flow] = pending
        try:
            yield WebsocketClosingHook(self.flow)
        finally:
            _closing.pop(self.flow, None)
        for sender, content, is_text in pending.queued:
            yield from _send(self, sender, content, is_text)
        # The close goes back to mitmproxy's code, first of the source's events; what was read
        # already is not read again.
        src_ws._events.appendleft(close)
        src_ws.receive_data = _read_nothing
        try:
            yield from relay(self, events.DataReceived(src_ws.conn, b""))
        finally:
            del src_ws.receive_data

    setattr(wrapper, _MARK, True)
    return wrapper


def _read_nothing(data: bytes | None) -> None:
    return None


def installed() -> bool:
    return getattr(ws_layer.WebsocketLayer.relay_messages, _MARK, False)


def install() -> None:
    """Fire `websocket_closing` before every WebSocket close from now on (idempotent)."""
    mitmcompat.require("websocket_closing")
    layer = ws_layer.WebsocketLayer
    if not installed():
        layer.relay_messages = _closing_relay(layer.relay_messages)  # type: ignore[method-assign]
