"""shapes/mcp: JSON-RPC 2.0 and MCP streamable-HTTP messages, as the gateway reads them."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluicegate.shapes import mcp
from sluicegate.shapes.sse import SseParser

CALL = {
    "jsonrpc": "2.0",
    "id": 7,
    "method": "tools/call",
    "params": {"name": "read_file", "arguments": {"path": "/etc/hosts"}},
}
LIST_RESULT = {
    "jsonrpc": "2.0",
    "id": 2,
    "result": {
        "tools": [
            {
                "name": "search",
                "description": "Search the repo.",
                "inputSchema": {"type": "object"},
            },
            {"name": "delete_branch", "description": "Delete.", "inputSchema": {"type": "object"}},
        ],
        "nextCursor": "abc",
    },
}


def _bytes(value: object) -> bytes:
    return json.dumps(value).encode()


def test_a_tools_call_request_names_its_method_tool_and_arguments() -> None:
    body = mcp.parse_json(_bytes(CALL))
    assert body is not None and not body.batch
    (message,) = body.messages
    assert message.kind == "request" and message.id == 7 and message.has_id
    assert message.method == "tools/call" and message.tool == "read_file"
    assert message.arguments == {"path": "/etc/hosts"}
    assert body.methods == ("tools/call",) and body.tools == ("read_file",)


def test_notifications_responses_and_errors_are_told_apart() -> None:
    note = mcp.parse_json(_bytes({"jsonrpc": "2.0", "method": "notifications/initialized"}))
    assert note is not None and note.messages[0].kind == "notification"
    assert not note.messages[0].has_id and note.requests == ()
    result = mcp.parse_json(_bytes({"jsonrpc": "2.0", "id": "a", "result": {"isError": True}}))
    assert result is not None and result.messages[0].kind == "response"
    assert result.messages[0].tool_result_is_error
    err = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "bad"}}
    error = mcp.parse_json(_bytes(err))
    assert error is not None and error.messages[0].error == {"code": -32600, "message": "bad"}
    assert error.messages[0].tool is None and error.messages[0].result is None


def test_a_batch_is_read_whole_or_not_at_all() -> None:
    batch = [CALL, {"jsonrpc": "2.0", "id": 8, "method": "tools/list"}]
    body = mcp.parse_json(_bytes(batch))
    assert body is not None and body.batch
    assert body.methods == ("tools/call", "tools/list") and body.tools == ("read_file",)
    assert mcp.parse_json(_bytes([CALL, {"not": "rpc"}])) is None
    assert mcp.parse_json(b"[]") is None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b'{"jsonrpc": "1.0", "id": 1, "method": "x"}',
        b'{"id": 1, "method": "x"}',
        b'{"jsonrpc": "2.0", "id": true, "method": "x"}',
        b'{"jsonrpc": "2.0", "id": 1.5, "method": "x"}',
        b'{"jsonrpc": "2.0", "id": 1, "method": 3}',
        b'{"jsonrpc": "2.0", "id": 1, "method": "x", "params": "p"}',
        b'{"jsonrpc": "2.0", "id": 1, "result": 1, "error": {"code": 1}}',
        b'{"jsonrpc": "2.0", "result": 1}',
        b'{"model": "gpt", "messages": []}',
        b"\xff\xfe",
    ],
)
def test_what_is_not_json_rpc_2_is_not_mcp(content: bytes) -> None:
    assert mcp.parse_json(content) is None


@pytest.mark.parametrize(
    "content",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","name":"rm"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call"}',
        b'{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}',
        b'[{"jsonrpc":"2.0","id":1,"method":"ping","params":{},"params":{}}]',
    ],
)
def test_a_repeated_deciding_member_is_ambiguous_not_read_either_way(content: bytes) -> None:
    with pytest.raises(mcp.McpAmbiguous) as caught:
        mcp.parse_json(content)
    assert caught.value.code == "mcp_ambiguous_message"


def test_repeated_argument_keys_are_the_tools_business() -> None:
    content = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"s",'
    content += b'"arguments":{"q":"a","q":"b"}}}'
    body = mcp.parse_json(content)
    assert body is not None and body.tools == ("s",)


def test_sse_answers_carry_messages_in_order_and_skip_priming_events() -> None:
    note = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
    stream = (
        b"id: prime\ndata:\n\n"
        + b": keep-alive\n\n"
        + b"event: message\ndata: "
        + _bytes(note)
        + b"\n\n"
        + b"event: message\r\nid: 5\r\ndata: "
        + _bytes(LIST_RESULT)
        + b"\r\n\r\n"
    )
    body = mcp.parse_answer(stream, "text/event-stream; charset=utf-8")
    assert body is not None
    assert [m.kind for m in body.messages] == ["notification", "response"]
    tools = body.messages[1].tools()
    assert [t.name for t in tools] == ["search", "delete_branch"]
    assert tools[0].description == "Search the repo." and tools[0].input_schema == {
        "type": "object"
    }
    assert mcp.parse_answer(b"data: hello\n\n", "text/event-stream") is None
    assert mcp.parse_answer(_bytes(LIST_RESULT), "application/json") is not None


def test_session_id_is_read_from_headers_in_any_case() -> None:
    assert mcp.session_id({"Mcp-Session-Id": "s1"}) == "s1"
    assert mcp.session_id([("content-type", "x"), ("MCP-SESSION-ID", "s2")]) == "s2"
    assert mcp.session_id({}) is None


def test_error_answers_answer_every_request_and_nothing_else() -> None:
    single = mcp.parse_json(_bytes(CALL))
    assert single is not None
    answer = mcp.error_answer(single, mcp.POLICY_ERROR_CODE, "blocked", {"rule": "r"})
    assert answer is not None
    assert json.loads(answer) == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {"code": -32001, "message": "blocked", "data": {"rule": "r"}},
    }
    batch = mcp.parse_json(_bytes([CALL, {"jsonrpc": "2.0", "method": "n"}, {**CALL, "id": "x"}]))
    assert batch is not None
    answers = json.loads(mcp.error_answer(batch, -32001, "no") or b"")
    assert [a["id"] for a in answers] == [7, "x"]
    note = mcp.parse_json(_bytes({"jsonrpc": "2.0", "method": "n"}))
    assert note is not None and mcp.error_answer(note, -32001, "no") is None


def test_tools_list_filtering_in_json_and_sse_answers() -> None:
    def keep(tool: mcp.McpTool) -> bool:
        return tool.name != "delete_branch"

    content, removed = mcp.filter_tools(_bytes(LIST_RESULT), "application/json", keep)
    assert removed == ["delete_branch"]
    result = json.loads(content)["result"]
    assert [t["name"] for t in result["tools"]] == ["search"] and result["nextCursor"] == "abc"

    stream = b"id: 1\nevent: message\ndata: " + _bytes(LIST_RESULT) + b"\n\n"
    new, removed = mcp.filter_tools(stream, "text/event-stream", keep)
    assert removed == ["delete_branch"]
    parser = SseParser()
    (event,) = parser.feed(new) + parser.finish()
    assert event.id == "1" and event.event == "message"
    assert [t["name"] for t in json.loads(event.data or "")["result"]["tools"]] == ["search"]

    untouched = b"data: " + _bytes(CALL) + b"\n\n"
    assert mcp.filter_tools(untouched, "text/event-stream", keep) == (untouched, [])
    everything = _bytes(LIST_RESULT)
    assert mcp.filter_tools(everything, "application/json", lambda t: True) == (everything, [])


def test_fingerprints_change_with_description_or_schema_not_with_key_order() -> None:
    tool = mcp.McpTool({"name": "s", "description": "d", "inputSchema": {"a": 1, "b": 2}})
    same = mcp.McpTool({"inputSchema": {"b": 2, "a": 1}, "description": "d", "name": "s"})
    assert tool.fingerprint() == same.fingerprint()
    assert tool.fingerprint().startswith("sha256:")
    assert tool.fingerprint() != mcp.McpTool({**tool.raw, "description": "d!"}).fingerprint()
    schema = {**tool.raw, "inputSchema": {"a": 1, "b": 3}}
    assert tool.fingerprint() != mcp.McpTool(schema).fingerprint()
    # Annotations and output schemas are not what the model is told to do.
    assert tool.fingerprint() == mcp.McpTool({**tool.raw, "annotations": {}}).fingerprint()


def test_name_globs() -> None:
    assert mcp.name_matches("read_file", ["read_*"])
    assert mcp.name_matches("tools/call", ["tools/*"])
    assert not mcp.name_matches("Read_file", ["read_*"])
    assert not mcp.name_matches("delete_branch", ["search", "read_*"])


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=12,
)


@given(_json)
def test_any_json_is_read_without_crashing_and_a_message_round_trips(value: object) -> None:
    body = mcp.parse_json(json.dumps(value).encode())
    if body is not None:
        for message in body.messages:
            assert mcp.message_of(dict(message.raw)) == message


@given(st.binary(max_size=200))
def test_any_bytes_are_read_without_crashing(content: bytes) -> None:
    for ctype in ("application/json", "text/event-stream"):
        try:
            mcp.parse_answer(content, ctype)
        except mcp.McpError:
            pass
        except Exception as e:  # the SSE parser's own refusals are fine too
            assert type(e).__name__.startswith("Sse"), e
