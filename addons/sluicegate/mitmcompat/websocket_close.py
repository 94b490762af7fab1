"""Closing a WebSocket from an addon, which mitmproxy has no API for (mitmproxy#4773).

The close is queued on the flow's WebsocketLayer (found in the connection's layer tree) and the
layer is woken by an injected empty message, which the WebSockets addon drops. Touches
mitmproxy internals: `proxyserver.connections[client].layer` and its children, the layer's
`client_ws._events`, and `WebSocketMessageInjected` (see tests/unit/test_mitmcompat.py).
"""

from __future__ import annotations

from typing import Any

import wsproto.events
from mitmproxy import ctx, http
from mitmproxy.proxy.layers.websocket import WebsocketLayer, WebSocketMessageInjected
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode


def close_websocket(flow: http.HTTPFlow, code: int, reason: str) -> bool:
    """Close both sides of `flow`'s WebSocket with `code` as soon as the current hook returns.

    The close is queued on the layer's client side, as if the client had sent it, and the layer
    is woken by an injected empty message (which this addon drops: the channel is closed). The
    layer then sends the close frame to both peers, closes both connections and fires
    `websocket_end`. False when there is no live layer for the flow.
    """
    proxyserver: Any = ctx.master.addons.get("proxyserver")
    connections = getattr(proxyserver, "connections", None)
    if not isinstance(connections, dict):
        return False
    handler = connections.get(flow.client_conn.id)
    layer = _websocket_layer(getattr(handler, "layer", None), flow)
    if layer is None:
        return False
    close = wsproto.events.CloseConnection(code=int(code), reason=reason)
    layer.client_ws._events.appendleft(close)
    wake = WebSocketMessage(Opcode.TEXT, True, b"")
    try:
        proxyserver.inject_event(WebSocketMessageInjected(flow, wake))
    except ValueError:  # the connection is already gone
        return False
    return True


def _websocket_layer(root: Any, flow: http.HTTPFlow) -> WebsocketLayer | None:
    """The WebsocketLayer relaying `flow`, searched through the connection's layer tree."""
    todo, seen = [root], set()
    while todo:
        layer = todo.pop()
        if layer is None or id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, WebsocketLayer):
            if layer.flow is flow:
                return layer
            continue
        # Children are held as `layer`, `child_layer`, per-stream, or only as the bound
        # `_handle_event` a layer delegates to (HttpProxy, NextLayer).
        delegate = getattr(getattr(layer, "_handle_event", None), "__self__", None)
        todo += [getattr(layer, "layer", None), getattr(layer, "child_layer", None), delegate]
        streams = getattr(layer, "streams", None)
        if isinstance(streams, dict):
            todo += streams.values()
    return None
