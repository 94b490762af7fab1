"""OpenAI Chat Completions (and legacy Completions) streamed chunks: where their text lives."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from sluicegate.shapes.channels import (
    Channels,
    Edit,
    Role,
    key_part,
    synthesized_event,
)


class ChatCompletions:
    """OpenAI Chat Completions (and legacy Completions) chunks.

    Channels: (choice index, delta field) for every string field of `delta` but `role` (content,
    refusal, reasoning, reasoning_content...), (choice, tool call index) for
    `tool_calls[j].function.arguments`, (choice, `function_call`), and (choice, `text`).
    When a choice's `finish_reason` arrives, its channels flush INTO that chunk.
    """

    def __init__(self, channels: Channels) -> None:
        self._channels = channels

    @staticmethod
    def matches(payload: Any) -> bool:
        return isinstance(payload, dict) and isinstance(payload.get("choices"), list)

    def rewrite(self, edit: Edit) -> None:
        for pos, choice in enumerate(edit.payload["choices"]):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", pos)
            index = index if isinstance(index, int) else pos
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(edit, index, delta)
            if isinstance(choice.get("text"), str):
                key = ("chat", index, "text")
                edit.put(choice, "text", self._feed(edit, key, choice["text"], role=Role.TEXT))
            if choice.get("logprobs") is not None:
                choice["logprobs"] = None
                edit.changed = True
            if choice.get("finish_reason") is not None:
                self._finish_choice(edit, index, choice)

    def _delta(self, edit: Edit, index: int, delta: dict[str, Any]) -> None:
        for name, value in list(delta.items()):
            if isinstance(value, str) and name != "role":
                key: tuple[Hashable, ...] = ("chat", index, "delta", name)
                edit.put(delta, name, self._feed(edit, key, value, role=Role.TEXT))
            elif name == "tool_calls" and isinstance(value, list):
                for pos, call in enumerate(value):
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                        key = ("chat", index, "tool", key_part(call.get("index", pos)))
                        args = self._feed(edit, key, function["arguments"], role=Role.JSON_TEXT)
                        edit.put(function, "arguments", args)
            elif (
                name == "function_call"
                and isinstance(value, dict)
                and isinstance(value.get("arguments"), str)
            ):
                key = ("chat", index, "function_call")
                args = self._feed(edit, key, value["arguments"], role=Role.JSON_TEXT)
                edit.put(value, "arguments", args)

    def _feed(self, edit: Edit, key: tuple[Any, ...], text: str, *, role: Role) -> str:
        return self._channels.feed(key, text, self._synthesizer(edit, key), role=role)

    def _synthesizer(self, edit: Edit, key: tuple[Any, ...]) -> Callable[[str], bytes]:
        payload, template = edit.payload, edit.event

        def synthesize(text: str) -> bytes:
            chunk = {name: value for name, value in payload.items() if name != "choices"}
            if "usage" in chunk:
                chunk["usage"] = None
            choice: dict[str, Any] = {"index": key[1]}
            self._append(choice, key, text, None)
            choice["finish_reason"] = None
            chunk["choices"] = [choice]
            return synthesized_event(template, chunk)

        return synthesize

    def _finish_choice(self, edit: Edit, index: int, choice: dict[str, Any]) -> None:
        for key in self._channels.open_keys():
            if not isinstance(key, tuple) or key[:2] != ("chat", index):
                continue
            if text := self._channels.flush(key):
                self._append(choice, key, text, edit)

    @staticmethod
    def _append(choice: dict[str, Any], key: tuple[Any, ...], text: str, edit: Edit | None) -> None:
        """Append flushed text to the field `key` names, creating the shape it needs."""
        if key[2] == "text":
            target, name = choice, "text"
        else:
            if not isinstance(choice.get("delta"), dict):
                choice["delta"] = {}
            target, name = choice["delta"], key[3] if key[2] == "delta" else "arguments"
            if key[2] == "function_call":
                target = _child(target, "function_call")
            elif key[2] == "tool":
                if not isinstance(target.get("tool_calls"), list):
                    target["tool_calls"] = []
                calls = [c for c in target["tool_calls"] if isinstance(c, dict)]
                call = next((c for c in calls if key_part(c.get("index")) == key[3]), None)
                if call is None:
                    call = {"index": key[3]}
                    target["tool_calls"].append(call)
                target = _child(call, "function")
        current = target.get(name)
        target[name] = (current if isinstance(current, str) else "") + text
        if edit is not None:
            edit.skip(target, name)
            edit.changed = True


def _child(parent: dict[str, Any], name: str) -> dict[str, Any]:
    child = parent.get(name)
    if not isinstance(child, dict):
        child = parent[name] = {}
    return child
