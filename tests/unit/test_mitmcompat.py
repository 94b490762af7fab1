"""Contract tests: the mitmproxy internals sluicegate.mitmcompat patches still look as expected.

Each test names one internal a patch touches. When a mitmproxy release changes it, the test fails
here, before a guard silently stops working in production.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions, http, version
from mitmproxy.addonmanager import AddonManager
from mitmproxy.addons import proxyserver
from mitmproxy.proxy import events as proxy_events
from mitmproxy.proxy import server
from mitmproxy.proxy.layers import websocket
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook, _events, _http1

from sluicegate import mitmcompat
from sluicegate.mitmcompat import (
    dispatch_cache,
    error_answers,
    head_limits,
    http1_protocol,
    protocol_errors,
    upstream_connect,
    websocket_closing,
)


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


# -- dispatch_cache: the same calls, in the same order, with the same error handling -----------


class _Recorder:
    """An addon whose hooks append (name, hook) to a shared log; `fail`/`halt` make one raise."""

    def __init__(self, name: str, log: list[tuple[str, str]], **behaviour: str) -> None:
        self.name = name
        self.log = log
        self.behaviour = behaviour

    def _hook(self, hook: str) -> None:
        self.log.append((self.name, hook))
        action = self.behaviour.get(hook)
        if action == "fail":
            raise ValueError(f"{self.name} failed")
        if action == "halt":
            raise exceptions.AddonHalt()
        if action == "options":
            raise exceptions.OptionsError("bad option")

    def request(self, flow: Any) -> None:
        self._hook("request")

    async def response(self, flow: Any) -> None:
        await asyncio.sleep(0)
        self._hook("response")


class _Parent(_Recorder):
    def __init__(self, name: str, log: list[tuple[str, str]], children: list[Any]) -> None:
        super().__init__(name, log)
        self.addons = children


class _NoHooks:
    name = "nohooks"


class _OddAttributes:
    """A module where a hook name is (skipped by mitmproxy) and a non-callable hook (an error)."""

    name = "odd"
    request = logging  # a module named like a hook: mitmproxy skips it
    response = 42  # not callable: mitmproxy logs an AddonManagerError and goes on

    def __repr__(self) -> str:
        return "odd"


def _chain(log: list[tuple[str, str]], **behaviour: dict[str, str]) -> list[Any]:
    def rec(name: str) -> _Recorder:
        return _Recorder(name, log, **behaviour.get(name, {}))

    return [
        rec("a"),
        _NoHooks(),
        _Parent("p", log, [rec("c1"), _Parent("c2", log, [rec("g")]), rec("c3")]),
        _OddAttributes(),
        rec("z"),
    ]


async def _dispatch(
    trigger_event: Any, behaviour: dict[str, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> tuple[list[tuple[str, str]], list[str], str | None]:
    from mitmproxy.test import taddons, tflow

    log: list[tuple[str, str]] = []
    raised = None
    caplog.clear()
    with taddons.context() as tctx:
        manager = tctx.master.addons
        manager.add(*_chain(log, **behaviour))
        flow = tflow.tflow(resp=True)
        for hook in (HttpRequestHook(flow), HttpResponseHook(flow)):
            try:
                await trigger_event(manager, hook)
            except Exception as e:
                raised = type(e).__name__
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return log, errors, raised


BEHAVIOURS = [
    {},
    {"c1": {"request": "fail"}},
    {"g": {"response": "fail"}},
    {"a": {"request": "halt"}},
    {"c2": {"response": "halt"}},
    {"c3": {"request": "options"}},
    {"z": {"request": "fail", "response": "fail"}},
]


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_dispatch_cache_calls_what_mitmproxy_calls(
    behaviour: dict[str, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    """Order (chain order, parents before children, depth first), an error skipping only the
    rest of its top-level addon's tree, AddonHalt ending the event, OptionsError propagating,
    modules skipped, non-callable hooks logged: as mitmproxy's own trigger_event does."""
    dispatch_cache.install()
    original = dispatch_cache.ORIGINALS["trigger_event"]
    cached = dispatch_cache._cached_trigger_event(original)

    async def compare() -> None:
        expected = await _dispatch(original, behaviour, caplog)
        assert expected[0]  # something ran
        assert await _dispatch(cached, behaviour, caplog) == expected
        assert await _dispatch(AddonManager.trigger_event, behaviour, caplog) == expected

    asyncio.run(compare())


def test_dispatch_cache_follows_added_removed_and_reordered_addons(tmp_path: Any) -> None:
    """Adding and removing addons, and loading, reloading and reordering scripts (ScriptLoader)
    are seen by the next event."""
    from mitmproxy.addons import script
    from mitmproxy.test import taddons, tflow

    dispatch_cache.install()
    paths = []
    for name in ("one", "two"):
        path = tmp_path / f"{name}.py"
        path.write_text(
            f"def request(flow):\n    flow.metadata.setdefault('calls', []).append({name!r})\n"
        )
        paths.append(str(path))

    async def fire(master: Any) -> list[str]:
        flow = tflow.tflow()
        await master.addons.trigger_event(HttpRequestHook(flow))
        return list(flow.metadata.get("calls", []))

    async def loaded(loader: Any) -> None:
        """Scripts load on their watcher task (as in mitmdump): let it run."""
        for _ in range(200):
            if all(s.ns is not None for s in loader.addons):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("scripts did not load")

    async def scenario() -> None:
        loader = script.ScriptLoader()
        with taddons.context(loader) as tctx:
            master = tctx.master
            assert await fire(master) == []
            tctx.configure(loader, scripts=paths)
            await loaded(loader)
            assert await fire(master) == ["one", "two"]
            tctx.configure(loader, scripts=list(reversed(paths)))
            assert await fire(master) == ["two", "one"]
            log: list[tuple[str, str]] = []
            extra = _Recorder("extra", log)
            master.addons.add(extra)
            assert await fire(master) == ["two", "one"]
            assert log == [("extra", "request")]
            master.addons.remove(extra)
            await fire(master)
            assert log == [("extra", "request")]
            # A script reloaded from disk (what the file watcher does) is a new module.
            Path(paths[0]).write_text(
                "def request(flow):\n    flow.metadata.setdefault('calls', []).append('v2')\n"
            )
            loader.addons[1].loadscript()
            assert await fire(master) == ["two", "v2"]
            tctx.configure(loader, scripts=[paths[1]])
            assert await fire(master) == ["two"]

    asyncio.run(scenario())


def test_dispatch_cache_contract_with_mitmproxy_internals() -> None:
    """The code dispatch_cache reproduces: trigger_event walks `self.chain` under `safecall`
    and stops on AddonHalt; hooks are found with getattr over `traverse([addon])`; only the
    ScriptLoader and Script built-ins have sub-addons, and none looks hooks up dynamically."""
    from mitmproxy.addons import default_addons, script

    dispatch_cache.install()
    trigger_event = inspect.getsource(dispatch_cache.ORIGINALS["trigger_event"])
    assert "for i in self.chain:" in trigger_event
    assert "with safecall():" in trigger_event
    assert "await self.invoke_addon(i, event)" in trigger_event
    assert "except exceptions.AddonHalt:" in trigger_event
    iter_hooks = inspect.getsource(AddonManager._iter_hooks)
    assert "for a in traverse([addon]):" in iter_hooks
    assert "getattr(a, event.name, None)" in iter_hooks
    invoke = inspect.getsource(AddonManager.invoke_addon)
    assert "func(*event.args())" in invoke and "inspect.isawaitable(res)" in invoke
    for addon in default_addons():
        has_children = hasattr(addon, "addons")
        assert has_children == isinstance(addon, script.ScriptLoader), addon
        assert "__getattr__" not in type(addon).__dict__, addon
    assert isinstance(inspect.getattr_static(script.Script, "addons"), property)


def test_gateway_addons_have_no_sub_addons_or_dynamic_hooks() -> None:
    """The gateway's chain: fixed methods, no `addons` lists (what the cache relies on)."""
    import runpy

    chain = runpy.run_path(str(Path(__file__).resolve().parents[2] / "addons" / "gateway.py"))
    for addon in chain["addons"]:
        assert not hasattr(addon, "addons"), addon
        for hook in ("request", "response", "requestheaders", "responseheaders", "error"):
            assert hook not in vars(addon), (addon, hook)


def test_hardening_installs_the_dispatch_cache() -> None:
    from sluicegate.mitm import hardening

    assert "dispatch_cache.install()" in inspect.getsource(hardening.ProxyHardening.load)
    dispatch_cache.install()
    assert dispatch_cache.installed()
    dispatch_cache.install()  # idempotent: wrapped once
    wrapped = dispatch_cache.ORIGINALS["trigger_event"]
    assert not getattr(wrapped, dispatch_cache._MARK, False)


def test_dispatch_cache_can_be_switched_off() -> None:
    """SLUICEGATE_DISPATCH_CACHE=0 leaves AddonManager as mitmproxy ships it (fresh process)."""
    import os
    import subprocess
    import sys

    code = (
        "from sluicegate.mitmcompat import dispatch_cache as d; d.install(); print(d.installed())"
    )
    root = Path(__file__).resolve().parents[2]
    for value, expected in (("0", "False"), ("1", "True")):
        env = {**os.environ, "SLUICEGATE_DISPATCH_CACHE": value, "PYTHONPATH": str(root / "addons")}
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.stdout.strip() == expected, done.stderr


def test_http1_layers_decide_piping_with_the_module_function() -> None:
    """http1_protocol wraps `_http1.should_make_pipe(request, response)`, which `mark_done`
    looks up as a module global once both messages are done."""
    assert list(inspect.signature(_http1.should_make_pipe).parameters) == ["request", "response"]
    assert "should_make_pipe(self.request, self.response)" in inspect.getsource(
        _http1.Http1Connection.mark_done
    )
    http1_protocol.install()
    http1_protocol.install()  # idempotent
    request = http.Request.make("GET", "https://example.com/", headers={"upgrade": "tcp"})
    for upgrade in ("tcp", "h2c", "websocket"):
        response = http.Response.make(101, b"", {"upgrade": upgrade})
        assert not _http1.should_make_pipe(request, response)
    request.headers["sec-websocket-version"] = "13"
    assert _http1.should_make_pipe(request, http.Response.make(101, b"", {"upgrade": "websocket"}))
    connect = http.Request.make("CONNECT", "https://example.com:443/")
    assert _http1.should_make_pipe(connect, http.Response.make(200))


def test_http1_trailers_are_read_by_read_body_and_never_written() -> None:
    """mitmproxy reads bodies in `Http1Connection.read_body` (h11 readers in `body_reader`,
    raising NotImplementedError on trailers) and writes with `send(event)` per side, which
    has no branch for trailer events."""
    source = inspect.getsource(_http1.Http1Connection.read_body.__wrapped__)
    assert "self.body_reader(self.buf)" in source and "h11.EndOfMessage" in source
    for cls in (_http1.Http1Server, _http1.Http1Client):
        send = inspect.getsource(getattr(cls.send, "__wrapped__", cls.send))
        assert "Trailers" not in send
    http1_protocol.install()
    assert getattr(_http1.Http1Connection.read_body, http1_protocol._MARK, False)
    server = _http1.Http1Server.__new__(_http1.Http1Server)
    server.stream_id = 1
    sent = list(_http1.Http1Server.send(server, _events.ResponseTrailers(1, http.Headers())))
    assert sent == []


def test_flow_errors_reach_the_client_through_handle_protocol_error() -> None:
    """error_answers wraps `HttpStream.handle_protocol_error(self, event)`, a command generator
    that sends `SendHttp(ResponseProtocolError, self.context.client)`, and replaces that command
    by a response made of ResponseHeaders / ResponseData / ResponseEndOfMessage."""
    from mitmproxy.proxy.layers import http as http_layers

    method = http_layers.HttpStream.handle_protocol_error
    original = getattr(method, "__wrapped__", method)
    assert inspect.isgeneratorfunction(original)
    assert list(inspect.signature(original).parameters) == ["self", "event"]
    source = inspect.getsource(original)
    assert "yield SendHttp(event, self.context.client)" in source
    # Connection failures (refused, TLS verification) come through it too.
    assert "self.handle_protocol_error(" in inspect.getsource(
        http_layers.HttpStream.make_server_connection
    )
    assert list(inspect.signature(_events.ResponseHeaders.__init__).parameters)[:4] == [
        "self",
        "stream_id",
        "response",
        "end_stream",
    ]
    assert list(inspect.signature(_events.ResponseData.__init__).parameters) == [
        "self",
        "stream_id",
        "data",
    ]
    assert list(inspect.signature(http_layers.SendHttp.__init__).parameters)[:3] == [
        "self",
        "event",
        "connection",
    ]
    error_answers.install()
    assert getattr(http_layers.HttpStream.handle_protocol_error, error_answers._MARK, False)


def test_http1_error_pages_come_from_the_module_level_make_error_response() -> None:
    """error_answers replaces `_http1.make_error_response(status_code, message) -> bytes`, which
    Http1Server looks up as a module global."""
    source = inspect.getsource(_http1.Http1Server)
    assert "make_error_response(event.code, event.message)" in source or (
        "make_error_response(status, event.message)" in source  # 12.x
    )
    assert "make_error_response(400, str(e))" in source
    error_answers.install()
    raw = _http1.make_error_response(502, "Error connecting to x: refused")
    assert raw.startswith(b"HTTP/1.1 502") and b'"code": "upstream_unreachable"' in raw


def test_a_connect_on_a_reverse_listener_is_refused_by_mitmproxy_with_a_known_message() -> None:
    """A CONNECT on the base-URL listener (reverse mode: an HTTP layer in transparent mode)
    never reaches `http_connect`: `HttpStream.check_invalid` refuses it with
    `validate_request`'s message, runs the requestheaders and error hooks (a response they set
    is ignored) and sends a 400 protocol error, which error_answers recognises by that message
    and answers 405 `base_url_proxy_request`."""
    from mitmproxy.proxy.layers import http as http_layers
    from mitmproxy.test import tutils

    request = tutils.treq(method=b"CONNECT", scheme=b"", path=b"", authority=b"api.test:443")
    message = http_layers.validate_request(http_layers.HTTPMode.transparent, request, False)
    assert message is not None
    status, code, _ = error_answers.classify(400, message)
    assert (status, code) == (405, "base_url_proxy_request")
    regular = http_layers.validate_request(http_layers.HTTPMode.regular, request, False)
    assert regular is None  # the proxy listener takes CONNECT
    source = inspect.getsource(http_layers.HttpStream.state_wait_for_request_headers)
    assert source.index("self.check_invalid(True)") < source.index('method == "CONNECT"')
    check = inspect.getsource(http_layers.HttpStream.check_invalid)
    assert "yield HttpRequestHeadersHook(self.flow)" in check and "ResponseProtocolError(" in check


def test_protocol_error_codes_tell_the_http_status() -> None:
    """error_answers reads the status of a ResponseProtocolError's code (int or ErrorCode)."""
    if hasattr(_events, "ErrorCode"):  # 12.x
        assert error_answers.http_status(_events.ErrorCode.CONNECT_FAILED) == 502
        assert error_answers.http_status(_events.ErrorCode.KILL) is None
    else:
        from mitmproxy.net.http import status_codes

        assert _events.ResponseProtocolError(1, "x").code == 502
        assert error_answers.http_status(status_codes.NO_RESPONSE) is None
        assert error_answers.http_status(502) == 502


# -- websocket_closing: a hook before a WebSocket close, messages sent ahead of it ----------------


def test_websocket_layer_relays_as_websocket_closing_expects() -> None:
    """websocket_closing wraps `WebsocketLayer.relay_messages(self, event)`, which `start` binds
    as `_handle_event`; it reads the source side with `src_ws.events()` and feeds it with
    `src_ws.receive_data(...)`, and handles a CloseConnection inside that loop (sending the
    close and firing websocket_end). Messages ahead of a close are sent with `send2` or the
    frame protocol's `send_data`; only single-argument hooks reach addons."""
    from mitmproxy.proxy import mode_servers

    relay = inspect.getsource(websocket.WebsocketLayer.relay_messages)
    assert "for ws_event in src_ws.events():" in relay
    assert "src_ws.receive_data(event.data)" in relay
    assert "src_ws.receive_data(None)" in relay
    assert "isinstance(ws_event, wsproto.events.CloseConnection)" in relay
    assert "yield WebsocketEndHook(self.flow)" in relay
    assert "from_client = event.connection == self.context.client" in relay
    assert "from_client = event.message.from_client" in relay
    assert "self._handle_event = self.relay_messages" in inspect.getsource(
        websocket.WebsocketLayer.start
    )
    assert list(inspect.signature(websocket.Fragmentizer).parameters) == ["fragments", "is_text"]
    import wsproto.frame_protocol

    params = list(inspect.signature(wsproto.frame_protocol.FrameProtocol.send_data).parameters)
    assert params == ["self", "payload", "fin"]
    assert "(data,) = hook.args()" in inspect.getsource(
        mode_servers.ProxyConnectionHandler.handle_hook
    )


class _Peer:
    """The far end of one side of a WebsocketLayer: a wsproto connection reading what the layer
    sends it."""

    def __init__(self, client: bool) -> None:
        import wsproto

        kind = wsproto.ConnectionType.CLIENT if client else wsproto.ConnectionType.SERVER
        self.ws = wsproto.Connection(kind)
        self.got: list[Any] = []

    def read(self, data: bytes) -> None:
        self.ws.receive_data(data)
        self.got += list(self.ws.events())


class _LayerHarness:
    """A patched WebsocketLayer driven by hand: hooks are answered at once, `on_hook` plays the
    addons (hook name, flow -> None)."""

    def __init__(self, on_hook: Any) -> None:
        from mitmproxy.options import Options
        from mitmproxy.proxy.context import Context
        from mitmproxy.test import tflow

        websocket_closing.install()
        self.flow = tflow.twebsocketflow(messages=False)
        self.flow.response.headers.pop("Sec-WebSocket-Extensions", None)
        self.context = Context(tflow.tclient_conn(), Options())
        self.context.server = tflow.tserver_conn()
        self.layer = websocket.WebsocketLayer(self.context, self.flow)
        self.on_hook = on_hook
        self.client, self.server = _Peer(client=True), _Peer(client=False)
        self.hooks: list[str] = []
        self.feed(proxy_events.Start())

    def feed(self, event: Any) -> None:
        from mitmproxy.proxy import commands

        todo = [event]
        while todo:
            for command in self.layer.handle_event(todo.pop(0)):
                if isinstance(command, commands.SendData):
                    peer = self.client if command.connection is self.context.client else self.server
                    peer.read(command.data)
                elif isinstance(command, commands.StartHook):
                    self.hooks.append(command.name)
                    self.on_hook(command.name, self.flow)
                    todo.append(proxy_events.HookCompleted(command))

    def from_client(self, *items: Any) -> None:
        data = b"".join(self.client.ws.send(item) for item in items)
        self.feed(proxy_events.DataReceived(self.context.client, data))

    def from_server(self, *items: Any) -> None:
        data = b"".join(self.server.ws.send(item) for item in items)
        self.feed(proxy_events.DataReceived(self.context.server, data))


def _hold_and_release(released: dict[bool, bytes], sent: list[bool]) -> Any:
    """Addons that hold every message and, at the close, send `released[from_client]`."""

    def on_hook(name: str, flow: http.HTTPFlow) -> None:
        if name == "websocket_message":
            flow.websocket.messages[-1].drop()
        elif name == "websocket_closing":
            closing = websocket_closing.closing(flow)
            assert closing is not None
            for from_client, content in released.items():
                sent.append(closing.send(from_client, content))

    return on_hook


@pytest.mark.parametrize("client_closes", [True, False])
def test_websocket_closing_sends_both_ways_before_the_close(client_closes: bool) -> None:
    """Either side closes: each side gets what the hook released before the close frame (the
    closer too: before the answer to its close), and websocket_end comes after."""
    import wsproto.events as wse

    sent: list[bool] = []
    h = _LayerHarness(_hold_and_release({True: b"up", False: b"down"}, sent))
    h.from_client(wse.TextMessage("held up"))
    h.from_server(wse.TextMessage("held down"))
    close = wse.CloseConnection(code=1000, reason="bye")
    if client_closes:
        h.from_client(close)
    else:
        h.from_server(close)
    assert sent == [True, True]
    assert h.hooks == ["websocket_start", "websocket_message", "websocket_message",
                       "websocket_closing", "websocket_end"]  # fmt: skip
    for peer, text in ((h.server, "up"), (h.client, "down")):
        assert [type(e) for e in peer.got] == [wse.TextMessage, wse.CloseConnection]
        assert peer.got[0].data == text and peer.got[1].code == 1000
    assert [m.content for m in h.flow.websocket.messages if m.injected] == [b"up", b"down"]
    assert h.flow.websocket.close_code == 1000 and not h.flow.live


def test_websocket_closing_runs_after_the_messages_before_the_close() -> None:
    """A message and the close in one read: the message is relayed first, then the hook."""
    import wsproto.events as wse

    order: list[str] = []

    def on_hook(name: str, flow: http.HTTPFlow) -> None:
        order.append(name)
        if name == "websocket_closing":
            assert websocket_closing.closing(flow) is not None
            assert [m.content for m in flow.websocket.messages[-2:]] == [b"a", b"b"]

    h = _LayerHarness(on_hook)
    h.from_client(wse.TextMessage("a"), wse.TextMessage("b"), wse.CloseConnection(code=1001))
    assert order[1:] == ["websocket_message", "websocket_message", "websocket_closing",
                         "websocket_end"]  # fmt: skip
    assert [e.data for e in h.server.got[:2]] == ["a", "b"]
    assert isinstance(h.server.got[2], wse.CloseConnection) and h.server.got[2].code == 1001
    assert websocket_closing.closing(h.flow) is None  # only while the hook runs


def test_websocket_closing_cannot_send_to_a_side_whose_connection_dropped() -> None:
    import wsproto.events as wse

    sent: list[bool] = []
    h = _LayerHarness(_hold_and_release({True: b"up", False: b"down"}, sent))
    h.feed(proxy_events.ConnectionClosed(h.context.client))
    assert sent == [True, False]  # to the server yes; to the client that dropped, no
    assert [type(e) for e in h.server.got] == [wse.TextMessage, wse.CloseConnection]
    assert h.client.got == []
    assert h.hooks[-2:] == ["websocket_closing", "websocket_end"]


def test_websocket_closing_install_is_idempotent_and_guarded() -> None:
    websocket_closing.install()
    wrapped = websocket.WebsocketLayer.relay_messages
    websocket_closing.install()
    assert websocket.WebsocketLayer.relay_messages is wrapped
    assert websocket_closing.installed()
    from sluicegate.mitm import hardening

    assert "websocket_closing.install()" in inspect.getsource(hardening.ProxyHardening.load)
