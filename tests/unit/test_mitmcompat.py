"""Contract tests: the mitmproxy internals sluicegate.mitmcompat patches still look as expected.

Each test names one internal a patch touches. When a mitmproxy release changes it, the test fails
here, before a guard silently stops working in production.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest
from mitmproxy import version
from mitmproxy.addons import proxyserver
from mitmproxy.proxy import server
from mitmproxy.proxy.layers import websocket
from mitmproxy.proxy.layers.http import _events, _http1

from sluicegate import mitmcompat
from sluicegate.mitmcompat import head_limits, protocol_errors, upstream_connect


def test_running_mitmproxy_is_supported() -> None:
    assert mitmcompat.supported(), version.VERSION


@pytest.mark.parametrize("release", ["10.4.2", "13.0.0", "0.11.0"])
def test_untested_release_refuses_to_install(release: str) -> None:
    with pytest.raises(mitmcompat.UnsupportedMitmproxy, match=release):
        mitmcompat.require("a_patch", release)


@pytest.mark.parametrize("cls", [_events.RequestProtocolError, _events.ResponseProtocolError])
def test_protocol_error_events_take_a_message(cls: type) -> None:
    """protocol_errors wraps `__init__(self, stream_id, message, ...)` to scrub `message`."""
    params = list(inspect.signature(cls.__init__).parameters)
    assert params[:3] == ["self", "stream_id", "message"]


def test_connection_log_lines_come_from_the_server_logger() -> None:
    """protocol_errors filters the logger mitmproxy's connection handler writes to."""
    assert logging.getLogger(server.__name__).name == protocol_errors.CONNECTION_LOGGER


@pytest.mark.parametrize("cls", [_http1.Http1Server, _http1.Http1Client])
def test_http1_layers_read_heads_in_read_headers(cls: type) -> None:
    """head_limits caps the generator method each HTTP/1 side reads a head with."""
    method = cls.__dict__.get("read_headers") or cls.read_headers
    assert inspect.isgeneratorfunction(getattr(method, "__wrapped__", method))
    assert list(inspect.signature(method).parameters)[:2] == ["self", "event"]
    head_limits.install()
    assert getattr(cls.read_headers, head_limits._MARK, False)


def test_websocket_layer_exposes_what_close_websocket_uses() -> None:
    """websocket_close queues a CloseConnection on `client_ws._events` of the flow's layer and
    wakes it with WebSocketMessageInjected(flow, message); it finds the layer through the
    proxyserver addon's `connections` (client id -> handler with `.layer`)."""
    source = inspect.getsource(websocket.WebsocketLayer)
    assert "self.client_ws" in source and "self.flow" in source
    assert list(inspect.signature(websocket.WebSocketMessageInjected).parameters)[:2] == [
        "flow",
        "message",
    ]
    assert "self.connections" in inspect.getsource(proxyserver.Proxyserver.__init__)
    assert hasattr(proxyserver.Proxyserver, "inject_event")
    import wsproto.connection

    assert "_events" in inspect.getsource(wsproto.connection.Connection.__init__)


def test_upstream_connections_are_opened_by_the_server_modules_asyncio() -> None:
    """upstream_connect replaces the `asyncio` name in mitmproxy's proxy server module: TCP
    upstream connections are opened there, and only there, with
    `asyncio.open_connection(*command.connection.address, local_addr=...)`, after the
    server_connect hook."""
    source = inspect.getsource(server)
    assert source.count("asyncio.open_connection(") == 1
    method = inspect.getsource(server.ConnectionHandler.open_connection)
    assert "asyncio.open_connection(\n" in method or "asyncio.open_connection(" in method
    assert "*command.connection.address" in method and "local_addr=" in method
    assert method.index("ServerConnectHook") < method.index("asyncio.open_connection(")
    upstream_connect.install()
    assert server.asyncio.open_connection is upstream_connect.open_connection
    assert server.asyncio.CancelledError is asyncio.CancelledError
    assert server.asyncio.current_task is asyncio.current_task
