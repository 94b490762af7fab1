"""The fail-closed guard, with mitmproxy's test flows."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from mitmproxy.test import taddons, tflow

from sluicegate.mitm import flowstate, guard


class Boom(Exception):
    pass


class Example:
    config: Any = object()

    def __init__(self) -> None:
        self.calls = 0

    @guard.fail_closed("example_error")
    def request(self, flow: Any) -> None:
        self.calls += 1
        raise Boom("secret-value-in-exception-text")

    @guard.fail_closed("example_error", status=502)
    def responseheaders(self, flow: Any) -> None:
        raise Boom("secret-value-in-exception-text")

    @guard.fail_closed("example_error")
    async def response(self, flow: Any) -> None:
        raise guard.GatewayRefusal(403, "blocked_by_test", "Blocked.", {"x-why": "test"})


def body(flow: Any) -> dict:
    return json.loads(flow.response.content)["error"]


def test_exception_in_request_hook_answers_with_json_error(caplog: Any) -> None:
    addon = Example()
    flow = tflow.tflow()
    addon.request(flow)
    assert flow.response.status_code == 500
    error = body(flow)
    assert error["code"] == "example_error"
    assert error["request_id"] == flow.id
    assert "secret-value" not in flow.response.text
    assert "secret-value" not in caplog.text
    assert "Boom" in caplog.text and flow.id in caplog.text
    assert flow.response.headers[guard.REQUEST_ID_HEADER] == flow.id
    assert flow.metadata["sluicegate"]["refusal"]["code"] == "example_error"


def test_later_hooks_skip_a_refused_flow() -> None:
    addon = Example()
    flow = tflow.tflow()
    addon.request(flow)
    addon.request(flow)
    assert addon.calls == 1


def test_exception_in_responseheaders_discards_upstream_body() -> None:
    addon = Example()
    flow = tflow.tflow(resp=True)
    flow.response.headers["content-type"] = "text/plain"
    addon.responseheaders(flow)
    assert flow.response.status_code == 502
    assert flow.response.headers["content-type"] == "application/json"
    stream = flow.response.stream
    assert callable(stream)
    assert stream(b"upstream body with secrets") == []
    end = stream(b"")
    assert json.loads(end)["error"]["code"] == "example_error"
    assert flow.response.headers["content-length"] == str(len(end))


def test_refusal_in_async_hook_uses_its_status_and_headers() -> None:
    addon = Example()
    flow = tflow.tflow(resp=True)
    asyncio.run(addon.response(flow))
    assert flow.response.status_code == 403
    assert flow.response.headers["x-why"] == "test"
    assert body(flow) == {
        "code": "blocked_by_test",
        "message": "Blocked.",
        "type": "sluicegate_error",
        "request_id": flow.id,
    }


def test_unconfigured_addon_refuses_every_flow() -> None:
    addon = Example()
    addon.config = None
    flow = tflow.tflow()
    addon.request(flow)
    assert addon.calls == 0
    assert flow.response.status_code == 503
    assert body(flow)["code"] == "gateway_not_configured"


def test_sentinel_refuses_while_no_chain_is_live() -> None:
    sentinel = guard.ChainSentinel()
    live = Example()
    with taddons.context():
        guard.register_live(live)
        flow = tflow.tflow()
        sentinel.requestheaders(flow)
        assert flow.response is None
        guard.unregister_live(live)
        sentinel.requestheaders(flow)
        assert flow.response.status_code == 503
        assert body(flow)["code"] == "gateway_not_loaded"


def test_metadata_must_be_plain() -> None:
    flow = tflow.tflow()
    flowstate.record(flow, "ok", {"a": [1, "x", None, 2.5, b"raw"]})
    assert flow.metadata["sluicegate"]["ok"] == {"a": [1, "x", None, 2.5, b"raw"]}
    with pytest.raises(TypeError, match=r"sluicegate.bad: set cannot be saved"):
        flowstate.record(flow, "bad", {1, 2})


def test_recorded_facts_accumulate_and_replace_foreign_metadata() -> None:
    flow = tflow.tflow()
    flowstate.record(flow, "a", 1)
    flowstate.record(flow, "b", {"x": [2]})
    flowstate.record(flow, "a", 3)
    assert flow.metadata["sluicegate"] == {"request_id": flow.id, "a": 3, "b": {"x": [2]}}
    flow.metadata["sluicegate"] = {"foreign": object()}  # replaced by someone else
    flowstate.record(flow, "c", "z")
    assert flow.metadata["sluicegate"] == {"request_id": flow.id, "a": 3, "b": {"x": [2]}, "c": "z"}
    with pytest.raises(TypeError):
        flowstate.record(flow, "d", object())
    assert "d" not in flowstate.state(flow).facts and "d" not in flow.metadata["sluicegate"]
