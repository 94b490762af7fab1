"""Streamed SSE events through the content model: each event parsed once, its text routed.

`EventRewriter` takes parsed events (shapes/sse.py) one by one. A provider adapter
(shapes/providers/) says which fields of the event are streamed text channels and when a channel
ends; every other string (object keys too) is a key-addressed value handed to the `StringPolicy`,
which treats it as buffered JSON would. Held channel text is flushed when its channel ends, in a
synthesized event of the channel's own shape placed BEFORE the event that ends it (so a client that
stops reading at `[DONE]` or `message_stop` still gets it). The text channels release is kept in
`Channels.released` for the response policy: nothing parses an event a second time.

Decisions:
  * Opaque cryptographic fields (`OPAQUE_KEYS`: Anthropic `signature`, `redacted_thinking.data`,
    OpenAI `encrypted_content`) are not read by the rules (rewriting can only break them, and a
    high-entropy rule would); the flow's literal secrets are still scrubbed from them.
  * `logprobs` repeat the text token by token and cannot be redacted consistently: they are dropped
    (`null` in Chat Completions, `[]` in Responses deltas).
  * Responses events that repeat the full text (`*.done`, `response.completed`...) are redacted as
    whole text, which agrees with the streamed result, and are not counted twice in `counts`.
  * An event whose JSON repeats a key is redacted as a whole document (every occurrence scanned,
    as buffered JSON does), after the open channels are flushed: a parser may read either one.
  * `data:` that is not a JSON object or array (a JSON scalar like `3` counts as text) is one text
    channel across consecutive events, flushed by the next JSON event.
  * Lines other than data and comments (event, id, retry, unknown fields) are redacted whole.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import replace
from typing import Any

from sluicegate.shapes.channels import (
    Adapter,
    Channels,
    Edit,
    KeyRuleLike,
    Role,
    StringPolicy,
    TextStream,
    TextStreamFactory,
    UnsupportedEvent,
    dump_json,
    stream_counts,
)
from sluicegate.shapes.json_stream import JsonTextStream
from sluicegate.shapes.providers import adapters
from sluicegate.shapes.sse import SseError, SseEvent, SseLine, SseParser, format_event

OPAQUE_KEYS = frozenset({"signature", "encrypted_content"})


class WholeTextMemo:
    """Redacted short standalone strings, shareable by the streams of one text redactor.

    Ids, model names, roles and object keys repeat in every event of a stream and in every
    stream, so a memo kept across the streams of the same redactor makes a stream's first event
    as cheap as the others. Bounded: strings up to `MAX_CACHED` characters, cleared when
    `CACHE_SIZE` are held.
    """

    MAX_CACHED = 256
    CACHE_SIZE = 4096

    def __init__(self) -> None:
        self.results: dict[str, tuple[str, Mapping[str, int]]] = {}
        self.clean: set[str] = set()  # strings known to need nothing

    def remember(self, text: str, result: tuple[str, Mapping[str, int]]) -> None:
        if len(text) > self.MAX_CACHED:
            return
        if len(self.results) >= self.CACHE_SIZE:
            self.results.clear()
            self.clean.clear()
        self.results[text] = result
        if result == (text, {}):
            self.clean.add(text)


class StreamStrings:
    """A `StringPolicy` from a text stream factory alone: no key rules, each string read whole
    by a fresh stream (memoised). For readers that only want the text (policy views) and for
    engines tested without a rule pack; the gateway passes `redaction.json_redact.JsonStrings`."""

    def __init__(self, make_text_stream: TextStreamFactory, memo: WholeTextMemo | None = None):
        self._make = make_text_stream
        self.memo = memo if memo is not None else WholeTextMemo()

    def key_rule(self, name: str) -> KeyRuleLike | None:
        return None

    def masked(self, rule: KeyRuleLike, value: str) -> tuple[str, Mapping[str, int]] | None:
        return None

    def whole(self, text: str) -> tuple[str, Mapping[str, int]]:
        if not text or text in self.memo.clean:
            return text, {}
        cached = self.memo.results.get(text)
        if cached is None:
            # Text that starts like a JSON document is read as JSON, so escapes hide nothing.
            stream: TextStream = (
                JsonTextStream(self._make) if text.lstrip()[:1] in ("{", "[") else self._make()
            )
            cached = (stream.feed(text) + stream.flush(), dict(stream_counts(stream)))
            self.memo.remember(text, cached)
        return cached

    def opaque(self, text: str) -> tuple[str, Mapping[str, int]]:
        return text, {}

    def walk(
        self, node: Any, skip: Callable[[Any, Hashable], bool], *, count: bool
    ) -> tuple[Any, bool, Mapping[str, int]]:
        counts: Counter[str] = Counter()
        changed = [False]

        def string(text: str) -> str:
            new, found = self.whole(text)
            if count:
                counts.update(found)
            changed[0] |= new != text
            return new

        def visit(value: Any) -> Any:
            if isinstance(value, str):
                return string(value)
            if isinstance(value, dict):
                for name, item in value.items():
                    if not skip(value, name) and isinstance(item, str | dict | list):
                        value[name] = visit(item)
                if not self.memo.clean.issuperset(value):
                    items = [(string(name), item) for name, item in value.items()]
                    value.clear()
                    value.update(items)
            elif isinstance(value, list):
                for pos, item in enumerate(value):
                    if isinstance(item, str | dict | list):
                        value[pos] = visit(item)
            return value

        return visit(node), changed[0], counts


class EventRewriter:
    """Rewrites parsed SSE events one by one; returns the bytes to emit for each."""

    _TEXT_KEY = ("text",)

    def __init__(
        self,
        make_text_stream: TextStreamFactory,
        *,
        max_channels: int = 1024,
        strings: StringPolicy | None = None,
        memo: WholeTextMemo | None = None,
    ) -> None:
        self._strings: Any = (
            strings if strings is not None else StreamStrings(make_text_stream, memo)
        )
        self._channels = Channels(
            make_text_stream,
            lambda: JsonTextStream(make_text_stream, strings),
            max_channels=max_channels,
        )
        self._counts: Counter[str] = Counter()
        self._shapes: tuple[Adapter, ...] = adapters(self._channels)

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._channels.counts + self._counts)

    def take_released(self) -> str:
        """The text the channels released since the last call (the stream's generated text)."""
        return self._channels.take_released()

    def rewrite(self, event: SseEvent) -> bytes:
        event = self._redacted_fields(event)
        comments = event.comments
        new_comments = [self._whole(c) for c in comments]
        data = event.data
        before: list[bytes] = []
        new_data = data
        if data is not None:
            if data.startswith("[DONE]"):
                before = self._channels.flush_events(self._channels.open_keys())
                new_data = self._whole(data)
            else:
                before, new_data = self._data(event, data)
        if new_data == data and new_comments == comments:
            return b"".join(before) + event.raw
        rebuilt = event.rebuild(
            new_data if new_data != data else None, new_comments if comments else None
        )
        return b"".join(before) + rebuilt

    def finish(self) -> bytes:
        """End of stream: every open channel's held text, as synthesized events."""
        return b"".join(self._channels.flush_events(self._channels.open_keys()))

    def _whole(self, text: str, *, count: bool = True) -> str:
        new, counts = self._strings.whole(text)
        if count:
            self._counts.update(counts)
        return str(new)

    def _redacted_fields(self, event: SseEvent) -> SseEvent:
        """Lines other than data and comments (event, id, retry, unknown fields) reach the client
        too: each is redacted whole, field name included, before anything reads them."""
        lines = list(event.lines)
        changed = False
        for i, line in enumerate(lines):
            if line.field is None or line.field == "data":
                continue
            text = line.raw.decode("utf-8")  # the parser only yields valid UTF-8 lines
            new = self._whole(text)
            if new != text:
                name, _, value = new.partition(":")
                value = value[1:] if value[:1] == " " else value
                lines[i] = SseLine(name, value, new.encode(), line.eol)
                changed = True
        return replace(event, lines=tuple(lines)) if changed else event

    def _data(self, event: SseEvent, data: str) -> tuple[list[bytes], str]:
        # Only objects and arrays are JSON events: a text stream's "3" or "null" is text.
        if data.lstrip(" \t\r\n")[:1] not in ("{", "["):
            return [], self._text(event, data)
        try:
            payload = json.loads(data)
            duplicates = _repeats_a_key(data, payload)
        except ValueError:
            return [], self._text(event, data)
        except RecursionError:
            raise UnsupportedEvent("SSE event JSON is nested too deeply") from None
        before: list[bytes] = []
        if self._TEXT_KEY in self._channels:
            before += self._channels.flush_events([self._TEXT_KEY])
        if duplicates:  # every occurrence read, as buffered JSON reads it
            before += self._channels.flush_events(self._channels.open_keys())
            return before, self._whole(data)
        edit = Edit(event, payload, before=before)
        if isinstance(payload, dict) and (payload.get("error") or payload.get("type") == "error"):
            edit.before += self._channels.flush_events(self._channels.open_keys())
        for shape in self._shapes:
            if shape.matches(payload):
                shape.rewrite(edit)
                break
        if "signature" in data or "encrypted_content" in data:
            self._opaque(payload, edit)
        try:
            new, changed, counts = self._strings.walk(payload, edit.skipped, count=not edit.repeat)
        except RecursionError:
            raise UnsupportedEvent("SSE event JSON is nested too deeply") from None
        self._counts.update(counts)
        return edit.before, dump_json(new) if edit.changed or changed else data

    def _opaque(self, node: Any, edit: Edit) -> None:
        """Opaque fields: only the flow's literal secrets are looked for, never the rules."""
        stack = [node]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                for name, value in item.items():
                    if name in OPAQUE_KEYS and isinstance(value, str):
                        new, counts = self._strings.opaque(value)
                        if not edit.repeat:
                            self._counts.update(counts)
                        edit.put(item, name, new)
                    elif isinstance(value, dict | list):
                        stack.append(value)
            elif isinstance(item, list):
                stack.extend(v for v in item if isinstance(v, dict | list))

    def _text(self, event: SseEvent, data: str) -> str:
        def synthesize(text: str) -> bytes:
            return format_event(text, event=event.event, id=event.id, eol=event.eol)

        return self._channels.feed(self._TEXT_KEY, data, synthesize, Role.TEXT)


_KEY_END = re.compile(r'"[ \t\r\n]*:')


def _repeats_a_key(data: str, payload: Any) -> bool:
    """Whether an object of `data` repeats a key (json.loads kept only the last occurrence).

    Every key in the text ends with `"` and a colon. When the text has no more such endings than
    the parsed objects have keys, nothing was collapsed; otherwise (a real repeat, or a value with
    an escaped quote before a colon) the text is parsed again keeping every pair, to know.
    """
    if len(_KEY_END.findall(data)) <= _keys(payload):
        return False
    repeated = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal repeated
        result = dict(items)
        repeated |= len(result) != len(items)
        return result

    json.loads(data, object_pairs_hook=pairs)
    return repeated


def _keys(node: Any) -> int:
    """How many keys the parsed objects under `node` hold."""
    kind = type(node)
    if kind is dict:
        count, values = len(node), node.values()
    elif kind is list:
        count, values = 0, node
    else:
        return 0
    for value in values:
        if type(value) is dict or type(value) is list:
            count += _keys(value)
    return count


class _Verbatim:
    """A text stream that releases everything at once: for reading text, not redacting it."""

    def feed(self, text: str) -> str:
        return text

    def flush(self) -> str:
        return ""


def generated_text(body: bytes, *, max_event_bytes: int = 8 << 20) -> str:
    """The text the channels of a buffered SSE body carry, joined in order (policy's view of it:
    a command split over many deltas is whole again). Stops quietly at malformed input; the raw
    view still covers it."""
    rewriter = EventRewriter(_Verbatim, strings=StreamStrings(_Verbatim))
    parser = SseParser(max_event_bytes=max_event_bytes)
    pieces: list[str] = []
    try:
        for event in [*parser.feed(body), *parser.finish()]:
            rewriter.rewrite(event)
            pieces.append(rewriter.take_released())
        rewriter.finish()
    except SseError:  # a view, not a verdict: the raw text is scanned anyway
        pass
    pieces.append(rewriter.take_released())
    return "".join(pieces)


class MessageReader:
    """The generated text of a sequence of JSON messages (WebSocket events, e.g. OpenAI realtime
    `response.text.delta`), read through the same provider adapters as SSE events, verbatim.
    State carries across messages, so a text split over many of them comes out whole."""

    def __init__(self) -> None:
        self._rewriter = EventRewriter(_Verbatim, strings=StreamStrings(_Verbatim))

    def read(self, message: str) -> str:
        """The channel text `message` carries (empty when no adapter knows its shape)."""
        event = SseEvent(lines=(SseLine("data", message, b"", b"\n"),), end=b"\n")
        # A view, not a verdict: the message's own text is scanned anyway.
        with contextlib.suppress(SseError):
            self._rewriter.rewrite(event)
        return self._rewriter.take_released()
