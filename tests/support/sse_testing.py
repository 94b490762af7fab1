"""Test double for the StreamRedactor of engine/redactor.py, plus SSE stream builders.

`FakeRedactor.stream()` satisfies the TextStream contract: for any split of a text,
"".join(feed(p)) + flush() == redact(text). It holds back only a suffix where a rule could still
match (regex partial matching), like the real one.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import regex

from sluicegate.shapes.sse import SseEvent, SseParser

RULES = {
    "openai-key": r"sk-[A-Za-z0-9_-]{20,}",
    "github-pat": r"ghp_[A-Za-z0-9]{36}",
    "aws-key-id": r"AKIA[0-9A-Z]{16}",
}
SECRETS = [
    "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t",
    "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    "AKIAIOSFODNN7EXAMPLE",
]


def tag(rule: str) -> str:
    return f"[REDACTED:{rule}]"


class FakeRedactor:
    def __init__(self, rules: dict[str, str] = RULES) -> None:
        self.names = list(rules)
        self.pattern = regex.compile(
            "|".join(f"(?P<r{i}>{pattern})" for i, pattern in enumerate(rules.values()))
        )

    def rule(self, match: regex.Match[str]) -> str:
        return self.names[int(match.lastgroup[1:])]

    def redact(self, text: str) -> str:
        return self.pattern.sub(lambda m: tag(self.rule(m)), text)

    def stream(self, max_hold: int = 4096) -> FakeStream:
        return FakeStream(self, max_hold)


class FakeStream:
    def __init__(self, redactor: FakeRedactor, max_hold: int) -> None:
        self._redactor = redactor
        self._max_hold = max_hold
        self._held = ""
        self.counts: Counter[str] = Counter()

    def feed(self, text: str) -> str:
        buf = self._held + text
        out, pos = [], 0
        pattern = self._redactor.pattern
        while True:
            match = pattern.search(buf, pos)
            hold = self._could_match_from(buf, pos, match.start() if match else len(buf))
            if hold is not None:
                break
            if match is None:
                hold = len(buf)
                break
            rule = self._redactor.rule(match)
            self.counts[rule] += 1
            out += [buf[pos : match.start()], tag(rule)]
            pos = match.end()
        out.append(buf[pos:hold])
        self._held = buf[hold:]
        if len(self._held) > self._max_hold:  # never released raw
            out.append(tag("held-overflow"))
            self._held = ""
        return "".join(out)

    def _could_match_from(self, buf: str, start: int, stop: int) -> int | None:
        """First position in [start, stop] where a match may still grow with more text.

        Not one `finditer(partial=True)`: regex prefers a complete match further on over a
        partial one earlier (`ghp_AKIA...` would let the AKIA rule win).
        """
        for pos in range(start, min(stop, len(buf) - 1) + 1):
            match = self._redactor.pattern.match(buf, pos, partial=True)
            if match is not None and (match.partial or match.end() == len(buf)):
                return pos
        return None

    def flush(self) -> str:
        held, self._held = self._held, ""
        for match in self._redactor.pattern.finditer(held):
            self.counts[self._redactor.rule(match)] += 1
        return self._redactor.redact(held)


def make_stream() -> FakeStream:
    return FakeRedactor().stream()


def events(stream: bytes) -> list[SseEvent]:
    parser = SseParser(max_event_bytes=1 << 24)
    return [e for e in parser.feed(stream) + parser.finish() if e.lines]


def payloads(stream: bytes) -> list[Any]:
    """JSON data of every event ([DONE] and non-JSON data as strings)."""
    out = []
    for event in events(stream):
        if event.data is None:
            continue
        try:
            out.append(json.loads(event.data))
        except ValueError:
            out.append(event.data)
    return out


def sse(payload: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"{head}data: {data}\n\n".encode()


# Stream builders, shaped after the public API documentation of each format.


def chat_stream(contents: list[str], *, tool_args: list[str] = (), finish: str = "stop") -> bytes:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x"}
    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    out = [sse({**base, "choices": [first]})]
    for piece in contents:
        choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
        out.append(sse({**base, "choices": [choice]}))
    for i, piece in enumerate(tool_args):
        call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
        if i == 0:
            call.update(id="call_1", type="function")
            call["function"]["name"] = "run"
        choice = {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}
        out.append(sse({**base, "choices": [choice]}))
    out.append(sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
    out.append(sse("[DONE]"))
    return b"".join(out)


def responses_stream(deltas: list[str], *, kind: str = "output_text") -> bytes:
    item = "msg_1" if kind == "output_text" else "fc_1"
    seq = iter(range(1000))
    out = [
        sse(
            {
                "type": "response.created",
                "sequence_number": next(seq),
                "response": {"id": "resp_1", "status": "in_progress", "output": []},
            },
            "response.created",
        ),
    ]
    scope: dict[str, Any] = {"item_id": item, "output_index": 0}
    if kind == "output_text":
        scope["content_index"] = 0
    for piece in deltas:
        event = f"response.{kind}.delta"
        out.append(
            sse({"type": event, **scope, "delta": piece, "sequence_number": next(seq)}, event)
        )
    full = "".join(deltas)
    if kind == "output_text":
        done = {"type": "response.output_text.done", **scope, "text": full}
        part = {"type": "output_text", "text": full, "annotations": []}
        item_obj = {"id": item, "type": "message", "role": "assistant", "content": [part]}
        out += [
            sse({**done, "sequence_number": next(seq)}, done["type"]),
            sse(
                {
                    "type": "response.content_part.done",
                    **scope,
                    "part": part,
                    "sequence_number": next(seq),
                },
                "response.content_part.done",
            ),
        ]
    else:
        done = {"type": "response.function_call_arguments.done", **scope, "arguments": full}
        item_obj = {
            "id": item,
            "type": "function_call",
            "name": "run",
            "arguments": full,
            "call_id": "call_1",
        }
        out.append(sse({**done, "sequence_number": next(seq)}, done["type"]))
    out.append(
        sse(
            {
                "type": "response.output_item.done",
                "output_index": 0,
                "item": item_obj,
                "sequence_number": next(seq),
            },
            "response.output_item.done",
        )
    )
    completed = {"id": "resp_1", "status": "completed", "output": [item_obj]}
    out.append(
        sse(
            {"type": "response.completed", "response": completed, "sequence_number": next(seq)},
            "response.completed",
        )
    )
    return b"".join(out)


def anthropic_stream(deltas: list[str], *, kind: str = "text", initial: str = "") -> bytes:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "claude-x",
        "stop_reason": None,
        "usage": {"input_tokens": 5},
    }
    if kind == "text":
        block: dict[str, Any] = {"type": "text", "text": initial}
        delta_type, name = "text_delta", "text"
    else:
        block = {"type": "tool_use", "id": "toolu_1", "name": "run", "input": {}}
        delta_type, name = "input_json_delta", "partial_json"
    out = [
        sse({"type": "message_start", "message": message}, "message_start"),
        sse(
            {"type": "content_block_start", "index": 0, "content_block": block},
            "content_block_start",
        ),
        sse({"type": "ping"}, "ping"),
    ]
    for piece in deltas:
        delta = {"type": delta_type, name: piece}
        out.append(
            sse({"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta")
        )
    out += [
        sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 9},
            },
            "message_delta",
        ),
        sse({"type": "message_stop"}, "message_stop"),
    ]
    return b"".join(out)


def chat_text(stream: bytes, field: str = "content") -> str:
    """Concatenated delta text of choice 0 (field) from a chat stream."""
    out = []
    for payload in payloads(stream):
        if isinstance(payload, dict):
            for choice in payload.get("choices", []):
                value = choice.get("delta", {}).get(field)
                out.append(value if isinstance(value, str) else "")
    return "".join(out)


def chat_tool_args(stream: bytes) -> str:
    out = []
    for payload in payloads(stream):
        if isinstance(payload, dict):
            for choice in payload.get("choices", []):
                for call in choice.get("delta", {}).get("tool_calls") or []:
                    out.append(call.get("function", {}).get("arguments", ""))
    return "".join(out)


def delta_text(stream: bytes, event_type: str, path: tuple[str, ...]) -> str:
    """Concatenated text at `path` of every event of `event_type` (Responses / Anthropic)."""
    out = []
    for payload in payloads(stream):
        if isinstance(payload, dict) and payload.get("type") == event_type:
            value: Any = payload
            for name in path:
                value = value.get(name, {}) if isinstance(value, dict) else {}
            out.append(value if isinstance(value, str) else "")
    return "".join(out)
