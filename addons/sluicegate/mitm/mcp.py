"""MCP traffic in the Policy addon: reading JSON-RPC request bodies, answering refusals as
JSON-RPC errors, judging `tools/list` answers (JSON and streamed SSE), recording MCP facts.

An MCP client shows a JSON-RPC error to its user (and model) as the tool call's failure; an HTTP
error page instead would break its session. So a refused MCP request that carries requests with
ids is answered `200` with one JSON-RPC error per request (`error.data` names the gateway's code,
rule and request id); a refused body of notifications only gets the refusal's HTTP status with a
JSON-RPC error without id, as the transport specification says.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from mitmproxy import http

from sluicegate.mitm import flowstate, guard
from sluicegate.policy.mcp import ToolListJudge
from sluicegate.shapes import mcp
from sluicegate.shapes.sse import SseParser

logger = logging.getLogger("sluicegate.policy")

# Refusals of the policy that an MCP client gets as JSON-RPC errors (others stay HTTP errors).
JSONRPC_REFUSALS = frozenset(
    {"policy_blocked", "approval_denied", "approval_timeout", "approval_cancelled"}
)


def read_request(content: bytes, ctype: str | None, *, mcp_route: bool) -> mcp.McpBody | None:
    """The request body as JSON-RPC. On an MCP route a POST body must be JSON-RPC (400)."""
    try:
        body = mcp.parse_json(content)
    except mcp.McpError as e:
        raise guard.GatewayRefusal(
            400, e.code, "The JSON-RPC message repeats a member, so it is ambiguous."
        ) from None
    if body is None and mcp_route:
        raise guard.GatewayRefusal(
            400,
            "mcp_invalid_message",
            "This route is an MCP server: a POST body must be a JSON-RPC 2.0 message.",
        )
    return body


def session_fingerprint(flow: http.HTTPFlow) -> str | None:
    """The Mcp-Session-Id, hashed: it works as the session's bearer, so facts name it by hash."""
    sid = mcp.session_id(flow.request.headers.items())
    if sid is None and flow.response is not None:
        sid = mcp.session_id(flow.response.headers.items())
    if sid is None:
        return None
    return "sha256:" + hashlib.sha256(sid.encode("utf-8", "replace")).hexdigest()[:16]


def request_facts(flow: http.HTTPFlow, body: mcp.McpBody) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    methods, tools = list(body.methods), list(body.tools)
    if methods:
        facts["method"] = methods[0]
    if tools:
        facts["tool"] = tools[0]
    if body.batch:
        facts["batch"] = len(body.messages)
        facts["methods"], facts["tools"] = methods, tools
    session = session_fingerprint(flow)
    if session is not None:
        facts["session"] = session
    return facts


def record(flow: http.HTTPFlow, **facts: Any) -> None:
    """Add to `metadata["sluicegate"]["mcp"]`."""
    current = dict(flowstate.state(flow).facts.get("mcp") or {})
    current.update(facts)
    flowstate.record(flow, "mcp", current)


def answer_refusal(flow: http.HTTPFlow, refusal: guard.GatewayRefusal) -> bool:
    """Answer a policy refusal of an MCP request as JSON-RPC errors; False when it does not
    apply (not JSON-RPC, or a refusal that is no policy decision)."""
    st = flowstate.state(flow)
    body = st.mcp.body if st.mcp is not None else None
    if body is None or refusal.code not in JSONRPC_REFUSALS:
        return False
    data = {"code": refusal.code, "request_id": st.request_id, "type": "sluicegate_error"}
    rule = refusal.headers.get("x-sluicegate-policy-rule")
    if rule:
        data["rule"] = rule
    content = mcp.error_answer(body, mcp.POLICY_ERROR_CODE, refusal.message, data)
    status = 200
    if content is None:  # notifications only: an HTTP error, with a JSON-RPC error without id
        status = refusal.status
        error = mcp.error_message(None, mcp.POLICY_ERROR_CODE, refusal.message, data)
        content = json.dumps(error, separators=(",", ":")).encode()
    logger.info(
        "sluicegate: refused %s as JSON-RPC error (%s) [request %s]", refusal.code, status, flow.id
    )
    st.refusal = flowstate.Refusal(
        status=status, code=refusal.code, message=refusal.message, phase="request"
    )
    headers = {
        "content-type": "application/json",
        "cache-control": "no-store",
        guard.REQUEST_ID_HEADER: st.request_id,
        **refusal.headers,
    }
    flow.response = http.Response.make(status, content, headers)
    record(flow, error=refusal.code, answered="jsonrpc_error")
    flowstate.publish(flow)
    return True


def judge_answer(flow: http.HTTPFlow, judge: ToolListJudge) -> None:
    """A buffered answer: withhold the tools the judge refuses (JSON or SSE)."""
    response = flow.response
    assert response is not None
    content = response.content or b""
    new, removed = mcp.filter_tools(content, response.headers.get("content-type"), judge.keep)
    if removed:
        response.content = new


class StreamFilter:
    """Withholds refused tools from the `tools/list` results of a streamed answer.

    Fed the whole redacted events the stream releases (see `StreamSession`); parses them with
    its own parser (so a piece is never split inside an event) and rewrites the events that
    carry a `tools/list` result. Exceptions go to the stream's fail-closed handling."""

    def __init__(self, judge: ToolListJudge) -> None:
        self.judge = judge
        self._parser = SseParser(max_event_bytes=64 << 20)

    def __call__(self, out: bytes, end: bool) -> bytes:
        events = self._parser.feed(out)
        if end:
            events += self._parser.finish()
        return b"".join(mcp.filter_event(event, self.judge.keep)[0] for event in events)
