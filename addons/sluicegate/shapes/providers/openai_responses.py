"""OpenAI Responses API streamed events: where their text lives."""

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


class Responses:
    """OpenAI Responses API events.

    Every `response.*.delta` event with a string `delta` is a channel keyed by its type and
    (item_id, output_index, content_index, summary_index); `*arguments.delta` channels are JSON.
    A `*.done` event first flushes the channels of its item (and content/summary part), then is
    redacted as whole text; terminal events flush everything.
    """

    TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
    _INDEXES = ("output_index", "content_index", "summary_index")

    def __init__(self, channels: Channels) -> None:
        self._channels = channels

    @staticmethod
    def matches(payload: Any) -> bool:
        return isinstance(payload, dict) and str(payload.get("type", "")).startswith("response.")

    def rewrite(self, edit: Edit) -> None:
        payload = edit.payload
        kind: str = payload["type"]
        if kind.endswith(".delta") and isinstance(payload.get("delta"), str):
            prefix = kind.removesuffix(".delta")
            key: tuple[Hashable, ...] = ("responses", prefix, key_part(payload.get("item_id")))
            key += tuple(key_part(payload.get(name)) for name in self._INDEXES)
            synthesize = self._synthesizer(edit)
            role = Role.JSON_TEXT if prefix.endswith("arguments") else Role.TEXT
            text = self._channels.feed(key, payload["delta"], synthesize, role=role)
            edit.put(payload, "delta", text)
            if payload.get("logprobs"):
                payload["logprobs"] = []
                edit.changed = True
        elif kind in self.TERMINAL:
            edit.before += self._channels.flush_events(self._channels.open_keys())
            edit.repeat = True
        elif kind.endswith(".done"):
            edit.before += self._channels.flush_events(self._done_keys(payload, kind))
            edit.repeat = True

    def _done_keys(self, payload: dict[str, Any], kind: str) -> list[Hashable]:
        item = payload.get("item")
        item_id = key_part(
            payload.get("item_id", item.get("id") if isinstance(item, dict) else None)
        )
        keys: list[Hashable] = []
        for key in self._channels.open_keys():
            if not (isinstance(key, tuple) and key[0] == "responses"):
                continue
            if item_id is None and key[1] != kind.removesuffix(".done"):
                continue
            if item_id is not None and key[2] != item_id:
                continue
            if all(
                name not in payload or key[3 + i] == key_part(payload[name])
                for i, name in enumerate(self._INDEXES)
                if name != "output_index"
            ):
                keys.append(key)
        return keys

    @staticmethod
    def _synthesizer(edit: Edit) -> Callable[[str], bytes]:
        payload, template = edit.payload, edit.event

        def synthesize(text: str) -> bytes:
            delta = dict(payload, delta=text)
            if "logprobs" in delta:
                delta["logprobs"] = []
            return synthesized_event(template, delta)

        return synthesize
