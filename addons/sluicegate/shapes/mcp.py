"""MCP (Model Context Protocol) messages as the gateway sees them: JSON-RPC 2.0 over HTTP.

MCP's streamable-HTTP transport POSTs one JSON-RPC message (older revisions: a batch, a JSON
array) per request; the server answers with `application/json` or with a `text/event-stream`
whose events each carry one JSON-RPC message (the response, and notifications or requests of the
server before it). A session is named by the `Mcp-Session-Id` header.

This module recognises those messages and gives a typed view of them (method, id, the tool name
and arguments of `tools/call`, results and errors, the tool entries of a `tools/list` result),
builds the JSON-RPC errors the gateway answers with, rewrites `tools/list` results, and
fingerprints tool definitions for pinning. Pure: no mitmproxy, no config.

Recognition is strict where a lenient reader could be fooled: a member that decides what a
message is (`jsonrpc`, `method`, `id`, `params`, a tool's `name`) given twice is ambiguous
(servers differ on which one they read), so such a body is not a message but an error
(`McpAmbiguous`); everything else that is not JSON-RPC 2.0 is simply not MCP (`None`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from sluicegate.shapes.sse import SseEvent, SseParser

JSONRPC_VERSION = "2.0"
SESSION_HEADER = "mcp-session-id"
TOOLS_CALL = "tools/call"
TOOLS_LIST = "tools/list"

# JSON-RPC error codes the gateway answers with. -32000..-32099 are reserved for
# implementation-defined server errors; clients show the message.
POLICY_ERROR_CODE = -32001
INVALID_REQUEST_CODE = -32600

Kind = Literal["request", "notification", "response", "error"]

# Members that decide what a message is, or which tool it calls: given twice, a body is ambiguous.
_DECIDING = frozenset({"jsonrpc", "method", "id", "params", "result", "error", "name"})


class McpError(Exception):
    """A body that looks like MCP but cannot be read safely. `code` is stable and safe to show."""

    code = "mcp_invalid_message"


class McpAmbiguous(McpError):
    """A deciding member is given twice: servers differ on which one they read."""

    code = "mcp_ambiguous_message"


@dataclasses.dataclass(frozen=True)
class McpMessage:
    """One JSON-RPC 2.0 message. `raw` is the decoded JSON object as sent."""

    kind: Kind
    raw: Mapping[str, Any]

    @property
    def id(self) -> str | int | float | None:
        value = self.raw.get("id")
        return value if isinstance(value, (str, int, float)) else None

    @property
    def has_id(self) -> bool:
        return self.kind != "notification"

    @property
    def method(self) -> str | None:
        value = self.raw.get("method")
        return value if isinstance(value, str) else None

    @property
    def params(self) -> Mapping[str, Any] | None:
        value = self.raw.get("params")
        return value if isinstance(value, Mapping) else None

    @property
    def tool(self) -> str | None:
        """The tool a `tools/call` request calls (None for anything else)."""
        if self.method != TOOLS_CALL or self.params is None:
            return None
        name = self.params.get("name")
        return name if isinstance(name, str) else None

    @property
    def arguments(self) -> Any:
        """The arguments of a `tools/call` request (None for anything else)."""
        if self.tool is None:
            return None
        assert self.params is not None
        return self.params.get("arguments")

    @property
    def result(self) -> Any:
        return self.raw.get("result") if self.kind == "response" else None

    @property
    def error(self) -> Mapping[str, Any] | None:
        value = self.raw.get("error")
        return value if self.kind == "error" and isinstance(value, Mapping) else None

    @property
    def tool_result_is_error(self) -> bool:
        """A `tools/call` result reporting a failed tool run (`isError`), not a protocol error."""
        result = self.result
        return isinstance(result, Mapping) and result.get("isError") is True

    def tools(self) -> list[McpTool]:
        """The tool entries of a `tools/list` result (entries without a string name skipped)."""
        result = self.result
        if not isinstance(result, Mapping):
            return []
        tools = result.get("tools")
        if not isinstance(tools, list):
            return []
        return [McpTool(t) for t in tools if isinstance(t, Mapping) and _is_name(t.get("name"))]

    @property
    def is_tools_list_result(self) -> bool:
        result = self.result
        return isinstance(result, Mapping) and isinstance(result.get("tools"), list)


@dataclasses.dataclass(frozen=True)
class McpTool:
    """One entry of a `tools/list` result."""

    raw: Mapping[str, Any]

    @property
    def name(self) -> str:
        return str(self.raw["name"])

    @property
    def description(self) -> str | None:
        value = self.raw.get("description")
        return value if isinstance(value, str) else None

    @property
    def input_schema(self) -> Any:
        return self.raw.get("inputSchema")

    def fingerprint(self) -> str:
        """What the model reads of the tool, hashed: name, title, description, input schema.

        Canonical JSON (sorted keys, no whitespace), so a server that reorders keys or
        reformats does not look changed; any change of text or schema does."""
        pinned = {k: self.raw.get(k) for k in ("name", "title", "description", "inputSchema")}
        text = json.dumps(pinned, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclasses.dataclass(frozen=True)
class McpBody:
    """The JSON-RPC messages of one body (a request body, or a JSON or SSE answer)."""

    messages: tuple[McpMessage, ...]
    batch: bool = False

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(m.method for m in self.messages if m.method is not None)

    @property
    def tools(self) -> tuple[str, ...]:
        return tuple(m.tool for m in self.messages if m.tool is not None)

    @property
    def requests(self) -> tuple[McpMessage, ...]:
        return tuple(m for m in self.messages if m.kind == "request")


# -- recognising messages ---------------------------------------------------------------------


def message_of(value: Any) -> McpMessage | None:
    """`value` (decoded JSON) as a JSON-RPC 2.0 message, or None when it is not one."""
    if not isinstance(value, Mapping) or value.get("jsonrpc") != JSONRPC_VERSION:
        return None
    method = value.get("method")
    if method is not None:
        if not isinstance(method, str):
            return None
        if "params" in value and not isinstance(value["params"], (Mapping, list)):
            return None
        if "id" not in value:
            return McpMessage("notification", value)
        return McpMessage("request", value) if _valid_id(value["id"]) else None
    if "id" not in value or not (_valid_id(value["id"]) or value["id"] is None):
        return None
    if "result" in value and "error" not in value:
        return McpMessage("response", value)
    if "error" in value and "result" not in value and isinstance(value["error"], Mapping):
        return McpMessage("error", value)
    return None


def parse_json(content: bytes | str) -> McpBody | None:
    """A JSON body as JSON-RPC: one message or a non-empty batch of them, else None.

    Raises `McpAmbiguous` for a body that repeats a deciding member (see module doc)."""
    if isinstance(content, bytes):
        try:
            content = content.decode("utf-8")
        except UnicodeDecodeError:
            return None
    stripped = content.lstrip()
    if not stripped or stripped[0] not in "{[":
        return None
    try:
        value = json.loads(content, object_pairs_hook=_strict_object)
    except (ValueError, RecursionError):
        return None
    return _body_of(value)


def parse_sse(content: bytes, *, max_event_bytes: int = 8 << 20) -> McpBody | None:
    """The JSON-RPC messages of a complete `text/event-stream` body, in order, or None when no
    event carries one. Events without data (priming events, keep-alive comments) are skipped."""
    parser = SseParser(max_event_bytes=max_event_bytes)
    events = parser.feed(content) + parser.finish()
    messages: list[McpMessage] = []
    for event in events:
        found = messages_of_event(event)
        if found is not None:
            messages.extend(found.messages)
    return McpBody(tuple(messages)) if messages else None


def messages_of_event(event: SseEvent) -> McpBody | None:
    """The JSON-RPC message(s) one SSE event carries, or None."""
    data = event.data
    if not data or (event.event not in (None, "", "message")):
        return None
    return parse_json(data)


def parse_answer(content: bytes, content_type: str | None) -> McpBody | None:
    """A server's answer, `application/json` or `text/event-stream`, as JSON-RPC messages."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "text/event-stream":
        return parse_sse(content)
    return parse_json(content)


def session_id(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> str | None:
    """The `Mcp-Session-Id` of a request or response, if any (header names ignore case)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in items:
        if name.lower() == SESSION_HEADER:
            return value
    return None


def _body_of(value: Any) -> McpBody | None:
    if isinstance(value, list):
        if not value:
            return None
        messages = [message_of(v) for v in value]
        if any(m is None for m in messages):
            return None
        return McpBody(tuple(m for m in messages if m is not None), batch=True)
    message = message_of(value)
    return McpBody((message,)) if message is not None else None


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out and key in _DECIDING:
            raise McpAmbiguous(f"JSON member {key!r} is given more than once")
        out[key] = value
    return out


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


# -- names and globs ------------------------------------------------------------------------------


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether `name` matches any glob (`*`, `?`, `[...]`), case-sensitively (tool names are)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# -- what the gateway writes --------------------------------------------------------------------


def error_message(
    id: str | int | float | None, code: int, message: str, data: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A JSON-RPC error response (id None for an error about a message without one)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = dict(data)
    return {"jsonrpc": JSONRPC_VERSION, "id": id, "error": error}


def error_answer(
    body: McpBody, code: int, message: str, data: Mapping[str, Any] | None = None
) -> bytes | None:
    """The JSON body answering every request of `body` with the same error (a batch with a
    batch), or None when `body` holds no request (notifications and responses get no answer)."""
    errors = [error_message(m.id, code, message, data) for m in body.requests]
    if not errors:
        return None
    value: Any = errors if body.batch else errors[0]
    return json.dumps(value, separators=(",", ":")).encode()


def filter_tools_json(value: Any, keep: Callable[[McpTool], bool]) -> tuple[Any, list[str]]:
    """`value` (a decoded JSON-RPC message or batch) with the `tools/list` entries `keep`
    refuses removed, and the names removed. Other messages and members are left as they are."""
    removed: list[str] = []

    def one(item: Any) -> Any:
        message = message_of(item)
        if message is None or not message.is_tools_list_result:
            return item
        kept = []
        for entry in message.raw["result"]["tools"]:
            if isinstance(entry, Mapping) and _is_name(entry.get("name")):
                if keep(McpTool(entry)):
                    kept.append(entry)
                else:
                    removed.append(str(entry["name"]))
            # an entry without a usable name is no callable tool: dropped
        if len(kept) == len(message.raw["result"]["tools"]):
            return item
        return {**item, "result": {**item["result"], "tools": kept}}

    out = [one(v) for v in value] if isinstance(value, list) else one(value)
    return out, removed


def filter_tools(
    content: bytes, content_type: str | None, keep: Callable[[McpTool], bool]
) -> tuple[bytes, list[str]]:
    """A whole answer (JSON or SSE) with refused `tools/list` entries removed; bytes unchanged
    when nothing is removed."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "text/event-stream":
        return _filter_json_text(content, keep)
    parser = SseParser(max_event_bytes=len(content) + 1)
    events = parser.feed(content) + parser.finish()
    out: list[bytes] = []
    removed: list[str] = []
    for event in events:
        new, gone = filter_event(event, keep)
        out.append(new)
        removed += gone
    return (b"".join(out) if removed else content), removed


def filter_event(event: SseEvent, keep: Callable[[McpTool], bool]) -> tuple[bytes, list[str]]:
    """One SSE event's bytes with refused `tools/list` entries removed from its data."""
    if messages_of_event(event) is None:
        return event.raw, []
    assert event.data is not None
    new, removed = _filter_json_text(event.data.encode(), keep)
    if not removed:
        return event.raw, []
    return event.rebuild(data=new.decode()), removed


def _filter_json_text(content: bytes, keep: Callable[[McpTool], bool]) -> tuple[bytes, list[str]]:
    if parse_json(content) is None:
        return content, []
    value = json.loads(content)
    new, removed = filter_tools_json(value, keep)
    if not removed:
        return content, []
    return json.dumps(new, separators=(",", ":"), ensure_ascii=False).encode(), removed
