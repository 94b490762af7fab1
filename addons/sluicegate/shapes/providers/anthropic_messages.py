"""Anthropic Messages streamed events: where their text lives."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from sluicegate.shapes.channels import (
    Channels,
    Edit,
    Role,
    key_part,
    str_field,
    synthesized_event,
)


class AnthropicMessages:
    """Anthropic Messages streaming events; one channel per content block index.

    `text_delta.text`, `thinking_delta.thinking` and `input_json_delta.partial_json` (JSON) are
    streamed; `content_block_start` may carry initial text. `content_block_stop` flushes its block
    in a synthesized `content_block_delta` before the stop; `message_delta`/`message_stop` flush
    whatever is still open. `signature_delta` is opaque and passes untouched.
    """

    TYPES = frozenset(
        {
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
            "ping",
        }
    )
    _DELTA_FIELDS = {
        "text_delta": "text",
        "thinking_delta": "thinking",
        "input_json_delta": "partial_json",
    }
    _START_DELTAS = {"text": "text_delta", "thinking": "thinking_delta"}

    def __init__(self, channels: Channels) -> None:
        self._channels = channels

    @classmethod
    def matches(cls, payload: Any) -> bool:
        return isinstance(payload, dict) and str_field(payload.get("type")) in cls.TYPES

    def rewrite(self, edit: Edit) -> None:
        payload = edit.payload
        kind = payload["type"]
        key = ("anthropic", key_part(payload.get("index")))
        if kind == "content_block_delta" and isinstance(payload.get("delta"), dict):
            delta = payload["delta"]
            delta_type = str_field(delta.get("type"))
            name = self._DELTA_FIELDS.get(delta_type or "")
            if delta_type is not None and name is not None and isinstance(delta.get(name), str):
                role = Role.JSON_TEXT if delta_type == "input_json_delta" else Role.TEXT
                synthesize = self._synthesizer(edit, key, delta_type, name)
                edit.put(
                    delta,
                    name,
                    self._channels.feed(key, delta[name], synthesize, role=role),
                )
            elif delta_type == "signature_delta":
                edit.skip(delta, "signature")
        elif kind == "content_block_start" and isinstance(payload.get("content_block"), dict):
            block = payload["content_block"]
            block_type = str_field(block.get("type"))
            if block_type in self._START_DELTAS and isinstance(block.get(block_type), str):
                delta_type = self._START_DELTAS[block_type]
                synthesize = self._synthesizer(edit, key, delta_type, block_type)
                text = self._channels.feed(key, block[block_type], synthesize, role=Role.TEXT)
                edit.put(block, block_type, text)
            elif block_type == "redacted_thinking":
                edit.skip(block, "data")
        elif kind == "content_block_stop":
            edit.before += self._channels.flush_events([key])
        elif kind in ("message_delta", "message_stop"):
            keys = [
                k
                for k in self._channels.open_keys()
                if isinstance(k, tuple) and k[0] == "anthropic"
            ]
            edit.before += self._channels.flush_events(keys)

    @staticmethod
    def _synthesizer(
        edit: Edit, key: tuple[str, Hashable], delta_type: str, name: str
    ) -> Callable[[str], bytes]:
        template = edit.event

        def synthesize(text: str) -> bytes:
            payload = {
                "type": "content_block_delta",
                "index": key[1],
                "delta": {"type": delta_type, name: text},
            }
            event = "content_block_delta" if template.event is not None else None
            return synthesized_event(template, payload, event=event)

        return synthesize
