"""Where streamed text lives in common SSE event shapes, and how to rewrite it.

LLM APIs stream one logical text (a message, a tool call's arguments, a reasoning trace) as many
small deltas. Each such text is a *channel* with its own `TextStream`: deltas are fed in order and
each event carries whatever the stream releases, so a secret split across events is still caught
while text that cannot be part of a match goes out at once. Every event is still emitted (perhaps
with an empty text field); held text is flushed when the channel ends, in a synthesized event of
the channel's own shape placed BEFORE the event that ends it (so a client that stops reading at
`[DONE]` or `message_stop` still gets it).

Every other string in a JSON event, object keys included, is redacted as whole text. Decisions:
  * Opaque cryptographic fields pass untouched: Anthropic `signature` / `signature_delta` and
    `redacted_thinking.data`, OpenAI `encrypted_content`. Rewriting them can only break them, and a
    high-entropy rule would.
  * `logprobs` repeat the text token by token and cannot be redacted consistently: they are dropped
    (`null` in Chat Completions, `[]` in Responses deltas).
  * Responses events that repeat the full text (`*.done`, `response.completed`...) are redacted as
    whole text, which agrees with the streamed result, and are not counted twice in `counts`.
  * SSE `event:`/`id:`/`retry:` values and unknown fields are server framing and pass as they are;
    comment lines are redacted as whole text.
  * `data:` that is not a JSON object or array (a JSON scalar like `3` counts as text) is one
    text channel across consecutive events, flushed by the next JSON event.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from sluicegate.shapes.sse import SseError, SseEvent, SseLine, format_event


class TextStream(Protocol):
    """One text channel's incremental redactor (`StreamRedactor` in engine/redactor.py)."""

    def feed(self, text: str) -> str: ...
    def flush(self) -> str: ...


TextStreamFactory = Callable[[], TextStream]


class SseTooManyChannels(SseError):
    code = "sse_too_many_channels"


class SseUnsupportedEvent(SseError):
    code = "sse_unsupported_event"


def stream_counts(stream: object) -> Mapping[str, int]:
    counts = getattr(stream, "counts", None)
    return counts if isinstance(counts, Mapping) else {}


# --- JSON text streamed in fragments (tool-call arguments) ---------------------------------------

_STRING_SPECIAL = re.compile(r'["\\]')
_STRUCTURE = re.compile(r"[{}\[\],:]")
_PLAIN_OUTSIDE = " \t\r\n{}[],:"  # structure that never needs redaction
_MUST_ESCAPE = re.compile(r'["\\\x00-\x1f\ud800-\udfff]')
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPED = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")
_MAX_KEY = 64
_MAX_DEPTH = 256

DEFAULT_SENSITIVE_KEYS = frozenset(
    {
        "password",
        "passwd",
        "secret",
        "client_secret",
        "secret_key",
        "token",
        "access_token",
        "refresh_token",
        "auth_token",
        "api_key",
        "private_key",
        "authorization",
        "aws_secret_access_key",
    }
)
SENSITIVE_KEY_RULE = "sensitive-key"
SENSITIVE_KEY_TAG = f"[REDACTED:{SENSITIVE_KEY_RULE}]"


def normalize_key(key: str) -> str:
    """`API-Key`, `api_key` and `apiKey` are the same name."""
    return re.sub(r"[^a-z0-9]", "", key.lower())


@functools.lru_cache(maxsize=16)
def _normalized(keys: frozenset[str]) -> frozenset[str]:
    return frozenset(normalize_key(key) for key in keys)


def encode_json_chars(text: str) -> str:
    """`text` as JSON string content: minimal escapes, lone surrogates as `\\uXXXX`."""
    return _MUST_ESCAPE.sub(_escape_char, text)


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT_ESCAPES.get(char) or f"\\u{ord(char):04x}"


class JsonTextStream:
    """A TextStream over JSON text that arrives in arbitrary fragments.

    Outside strings, structure passes straight through; bare tokens (numbers, literals, or garbage
    if the text is not JSON) go through a text stream of their own. Inside a string literal, escapes
    are decoded (even when an escape or a surrogate pair is split across fragments), the DECODED
    characters feed one text stream per string, and what it releases is re-encoded as JSON string
    content. So a secret survives in no escaped form (`sk\\u002d...`, `\\/`), and valid JSON in
    gives valid JSON out (unless a rule matches a bare token). String values under a sensitive key
    (`password`, `api_key`...) are replaced whole by `SENSITIVE_KEY_TAG`.
    """

    def __init__(
        self, make_text_stream: TextStreamFactory, sensitive_keys: Collection[str] = ()
    ) -> None:
        self._make = make_text_stream
        self._sensitive = _normalized(frozenset(sensitive_keys))
        self._string: TextStream | None = None  # the open string's stream; None while masking
        self._in_string = False
        self._escape = ""  # raw characters of an incomplete escape, from the backslash
        self._high = ""  # a decoded high surrogate waiting for its low half
        self._bare: TextStream | None = None
        self._finished: Counter[str] = Counter()
        # Structure, tracked only to know which key a string value belongs to.
        self._objects: list[bool] = []  # per open container: is it an object?
        self._expect_key = False
        self._is_key = False
        self._key = ""
        self._last_key = ""
        self._masked_any = False

    @property
    def counts(self) -> dict[str, int]:
        total = Counter(self._finished)
        for stream in (self._string, self._bare):
            total.update(stream_counts(stream))
        return dict(total)

    def feed(self, text: str) -> str:
        out: list[str] = []
        pos = 0
        while pos < len(text):
            step = self._inside if self._in_string else self._outside
            pos = step(text, pos, out)
        return "".join(out)

    def flush(self) -> str:
        """End of the arguments; an unterminated string is released redacted, left unclosed."""
        out: list[str] = []
        if self._in_string:
            decoded = [self._escape[1:]] if self._escape else []
            self._escape = ""
            self._close_string(decoded, out, closed=False)
        self._end_bare(out)
        return "".join(out)

    # outside strings

    def _outside(self, text: str, pos: int, out: list[str]) -> int:
        quote = text.find('"', pos)
        end = len(text) if quote < 0 else quote
        segment = text[pos:end]
        if self._sensitive:
            self._track_structure(segment)
        if self._bare is None:
            plain = len(segment) - len(segment.lstrip(_PLAIN_OUTSIDE))
            out.append(segment[:plain])
            segment = segment[plain:]
            if segment:
                self._bare = self._make()
        if self._bare is not None and segment:
            out.append(self._bare.feed(segment))
        if quote < 0:
            return len(text)
        self._end_bare(out)
        self._open_string()
        out.append('"')
        return quote + 1

    def _end_bare(self, out: list[str]) -> None:
        if self._bare is not None:
            out.append(self._bare.flush())
            self._finished.update(stream_counts(self._bare))
            self._bare = None

    def _track_structure(self, segment: str) -> None:
        for char in _STRUCTURE.findall(segment):
            if char in "{[":
                self._objects.append(char == "{")
                self._expect_key = char == "{"
            elif char in "}]":
                if self._objects:
                    self._objects.pop()
                self._expect_key = False
            elif char == ",":
                self._expect_key = bool(self._objects) and self._objects[-1]
            else:
                self._expect_key = False
        if len(self._objects) > _MAX_DEPTH:  # too deep to care: stop masking by key
            self._sensitive = frozenset()

    def _open_string(self) -> None:
        self._in_string = True
        self._is_key = self._expect_key and bool(self._objects) and self._objects[-1]
        self._key = ""
        self._masked_any = False
        masked = not self._is_key and normalize_key(self._last_key) in self._sensitive
        self._string = None if masked else self._make()

    # inside a string

    def _inside(self, text: str, pos: int, out: list[str]) -> int:
        decoded: list[str] = []
        while pos < len(text):
            if self._escape:
                pos = self._escape_char(text, pos, decoded)
                continue
            special = _STRING_SPECIAL.search(text, pos)
            end = len(text) if special is None else special.start()
            if end > pos:
                self._take_chars(text[pos:end], decoded)
                pos = end
            if special is None:
                break
            if text[pos] == "\\":
                self._escape = "\\"
                pos += 1
                continue
            self._close_string(decoded, out, closed=True)
            return pos + 1
        self._release(decoded, out)
        return pos

    def _escape_char(self, text: str, pos: int, decoded: list[str]) -> int:
        char = text[pos]
        if self._escape == "\\":
            if char == "u":
                self._escape = "\\u"
                return pos + 1
            self._escape = ""
            # Not JSON; decoding `\q` as `q` keeps an oddly escaped secret visible to the rules.
            self._take_chars(_ESCAPED.get(char, char), decoded)
            return pos + 1
        if char not in _HEX:  # malformed \u escape: its characters are text, then go on
            self._take_chars(self._escape[1:], decoded)
            self._escape = ""
            return pos
        self._escape += char
        if len(self._escape) == 6:
            unit = int(self._escape[2:], 16)
            self._escape = ""
            self._take_unit(unit, decoded)
        return pos + 1

    def _take_unit(self, unit: int, decoded: list[str]) -> None:
        if self._high:
            if 0xDC00 <= unit <= 0xDFFF:
                decoded.append(chr(0x10000 + ((ord(self._high) - 0xD800) << 10) + unit - 0xDC00))
                self._high = ""
                return
            decoded.append(self._high)
            self._high = ""
        if 0xD800 <= unit <= 0xDBFF:
            self._high = chr(unit)
        else:
            decoded.append(chr(unit))

    def _take_chars(self, chars: str, decoded: list[str]) -> None:
        if self._high:
            decoded.append(self._high)
            self._high = ""
        decoded.append(chars)

    def _release(self, decoded: list[str], out: list[str]) -> None:
        text = "".join(decoded)
        if not text:
            return
        if self._is_key and len(self._key) <= _MAX_KEY:
            self._key += text
        if self._string is None:
            self._masked_any = True
        else:
            out.append(encode_json_chars(self._string.feed(text)))

    def _close_string(self, decoded: list[str], out: list[str], *, closed: bool) -> None:
        if self._high:
            decoded.append(self._high)
            self._high = ""
        self._release(decoded, out)
        if self._string is None:
            if self._masked_any:
                out.append(SENSITIVE_KEY_TAG)
                self._finished[SENSITIVE_KEY_RULE] += 1
        else:
            out.append(encode_json_chars(self._string.flush()))
            self._finished.update(stream_counts(self._string))
        if self._is_key:
            self._last_key = self._key if len(self._key) <= _MAX_KEY else ""
            self._expect_key = False
        self._string = None
        self._in_string = False
        if closed:
            out.append('"')


# --- channels ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Channel:
    stream: TextStream
    synthesize: Callable[[str], bytes]  # an event of the channel's shape carrying flushed text


class Channels:
    """Open text channels by key, in opening order, with a cap on how many may be open."""

    def __init__(
        self,
        make_text_stream: TextStreamFactory,
        *,
        max_channels: int,
        sensitive_keys: Collection[str],
    ) -> None:
        self._make = make_text_stream
        self._max = max_channels
        self._sensitive = sensitive_keys
        self._open: dict[Hashable, Channel] = {}
        self._finished: Counter[str] = Counter()

    @property
    def counts(self) -> Counter[str]:
        total = Counter(self._finished)
        for channel in self._open.values():
            total.update(stream_counts(channel.stream))
        return total

    def open_keys(self) -> list[Hashable]:
        return list(self._open)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._open

    def feed(
        self, key: Hashable, text: str, synthesize: Callable[[str], bytes], *, json_text: bool
    ) -> str:
        channel = self._open.get(key)
        if channel is None:
            if len(self._open) >= self._max:
                raise SseTooManyChannels(f"more than {self._max} text channels open at once")
            stream = JsonTextStream(self._make, self._sensitive) if json_text else self._make()
            channel = self._open[key] = Channel(stream, synthesize)
        else:
            channel.synthesize = synthesize
        return channel.stream.feed(text)

    def flush(self, key: Hashable) -> str:
        channel = self._open.pop(key, None)
        if channel is None:
            return ""
        text = channel.stream.flush()
        self._finished.update(stream_counts(channel.stream))
        return text

    def flush_events(self, keys: Iterable[Hashable]) -> list[bytes]:
        """Close channels; their held text as synthesized events, in channel opening order."""
        wanted = set(keys)
        events = []
        for key in [k for k in self._open if k in wanted]:
            synthesize = self._open[key].synthesize
            if text := self.flush(key):
                events.append(synthesize(text))
        return events


class WholeTextMemo:
    """Redacted short standalone strings, shareable by the streams of one text redactor.

    Ids, model names, roles and object keys repeat in every event of a stream and in every
    stream, so a memo kept across the streams of the same redactor (and sensitive keys) makes
    a stream's first event as cheap as the others. Bounded: strings up to `MAX_CACHED`
    characters, cleared when `CACHE_SIZE` are held.
    """

    MAX_CACHED = 256
    CACHE_SIZE = 4096

    def __init__(self) -> None:
        self.results: dict[tuple[bool, str], tuple[str, Mapping[str, int]]] = {}
        self.clean: set[str] = set()  # plain strings known to need nothing

    def remember(self, json_text: bool, text: str, result: tuple[str, Mapping[str, int]]) -> None:
        if len(text) > self.MAX_CACHED:
            return
        if len(self.results) >= self.CACHE_SIZE:
            self.results.clear()
            self.clean.clear()
        self.results[(json_text, text)] = result
        if not json_text and result == (text, {}):
            self.clean.add(text)


class WholeText:
    """Redacts standalone strings: a fresh stream per string, memoised for short ones.

    Redaction is deterministic, and counts are replayed on every hit (see `WholeTextMemo`).
    """

    def __init__(
        self,
        make_text_stream: TextStreamFactory,
        sensitive_keys: Collection[str],
        memo: WholeTextMemo | None = None,
    ):
        self._make = make_text_stream
        self._sensitive = sensitive_keys
        self.memo = memo if memo is not None else WholeTextMemo()
        self.counts: Counter[str] = Counter()

    def redact(self, text: str, *, json_text: bool = False, count: bool = True) -> str:
        memo = self.memo
        if not text or (text in memo.clean and not json_text):
            return text
        cached = memo.results.get((json_text, text))
        if cached is None:
            stream: TextStream = (
                JsonTextStream(self._make, self._sensitive) if json_text else self._make()
            )
            cached = (stream.feed(text) + stream.flush(), dict(stream_counts(stream)))
            memo.remember(json_text, text, cached)
        if count and cached[1]:
            self.counts.update(cached[1])
        return cached[0]


# --- rewriting events ----------------------------------------------------------------------------

OPAQUE_KEYS = frozenset({"signature", "encrypted_content"})
JSON_TEXT_KEYS = frozenset({"arguments", "partial_json"})


@dataclass(slots=True)
class Edit:
    """One event being rewritten: what was handled by a channel, and what to emit before it."""

    event: SseEvent
    payload: Any
    before: list[bytes] = field(default_factory=list)
    handled: set[tuple[int, Hashable]] = field(default_factory=set)
    changed: bool = False
    repeat: bool = False  # strings repeat text already streamed (and counted)

    def put(self, container: Any, key: Hashable, value: Any) -> None:
        self.handled.add((id(container), key))
        if container[key] != value:
            container[key] = value
            self.changed = True

    def skip(self, container: Any, key: Hashable) -> None:
        self.handled.add((id(container), key))


def synthesized_event(template: SseEvent, payload: Any, *, event: str | None = None) -> bytes:
    """A new event framed like `template` (event name, id, line ending)."""
    return format_event(
        dump_json(payload), event=event or template.event, id=template.id, eol=template.eol
    )


def dump_json(payload: Any) -> str:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes in the input
        text = json.dumps(payload, separators=(",", ":"))
    return text


def _str_field(value: Any) -> str | None:
    """A field that should be a string, or None: event JSON is upstream-controlled, and a list
    where a type name belongs must not crash a lookup."""
    return value if isinstance(value, str) else None


def _key_part(value: Any) -> Hashable:
    return value if value is None or isinstance(value, str | int | float) else repr(value)


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
                edit.put(choice, "text", self._feed(edit, key, choice["text"], json_text=False))
            if choice.get("logprobs") is not None:
                choice["logprobs"] = None
                edit.changed = True
            if choice.get("finish_reason") is not None:
                self._finish_choice(edit, index, choice)

    def _delta(self, edit: Edit, index: int, delta: dict[str, Any]) -> None:
        for name, value in list(delta.items()):
            if isinstance(value, str) and name != "role":
                key = ("chat", index, "delta", name)
                edit.put(delta, name, self._feed(edit, key, value, json_text=False))
            elif name == "tool_calls" and isinstance(value, list):
                for pos, call in enumerate(value):
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                        key = ("chat", index, "tool", _key_part(call.get("index", pos)))
                        args = self._feed(edit, key, function["arguments"], json_text=True)
                        edit.put(function, "arguments", args)
            elif (
                name == "function_call"
                and isinstance(value, dict)
                and isinstance(value.get("arguments"), str)
            ):
                key = ("chat", index, "function_call")
                args = self._feed(edit, key, value["arguments"], json_text=True)
                edit.put(value, "arguments", args)

    def _feed(self, edit: Edit, key: tuple[Any, ...], text: str, *, json_text: bool) -> str:
        return self._channels.feed(key, text, self._synthesizer(edit, key), json_text=json_text)

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
            if key[:2] == ("chat", index) and (text := self._channels.flush(key)):
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
                call = next((c for c in calls if _key_part(c.get("index")) == key[3]), None)
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
    if not isinstance(parent.get(name), dict):
        parent[name] = {}
    return parent[name]


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
            key = ("responses", prefix, _key_part(payload.get("item_id")))
            key += tuple(_key_part(payload.get(name)) for name in self._INDEXES)
            synthesize = self._synthesizer(edit)
            json_text = prefix.endswith("arguments")
            text = self._channels.feed(key, payload["delta"], synthesize, json_text=json_text)
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
        item_id = _key_part(
            payload.get("item_id", item.get("id") if isinstance(item, dict) else None)
        )
        keys = []
        for key in self._channels.open_keys():
            if not (isinstance(key, tuple) and key[0] == "responses"):
                continue
            if item_id is None and key[1] != kind.removesuffix(".done"):
                continue
            if item_id is not None and key[2] != item_id:
                continue
            if all(
                name not in payload or key[3 + i] == _key_part(payload[name])
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
        return isinstance(payload, dict) and _str_field(payload.get("type")) in cls.TYPES

    def rewrite(self, edit: Edit) -> None:
        payload = edit.payload
        kind = payload["type"]
        key = ("anthropic", _key_part(payload.get("index")))
        if kind == "content_block_delta" and isinstance(payload.get("delta"), dict):
            delta = payload["delta"]
            delta_type = _str_field(delta.get("type"))
            name = self._DELTA_FIELDS.get(delta_type)
            if name is not None and isinstance(delta.get(name), str):
                json_text = delta_type == "input_json_delta"
                synthesize = self._synthesizer(edit, key, delta_type, name)
                edit.put(
                    delta,
                    name,
                    self._channels.feed(key, delta[name], synthesize, json_text=json_text),
                )
            elif delta_type == "signature_delta":
                edit.skip(delta, "signature")
        elif kind == "content_block_start" and isinstance(payload.get("content_block"), dict):
            block = payload["content_block"]
            block_type = _str_field(block.get("type"))
            if block_type in self._START_DELTAS and isinstance(block.get(block_type), str):
                delta_type = self._START_DELTAS[block_type]
                synthesize = self._synthesizer(edit, key, delta_type, block_type)
                text = self._channels.feed(key, block[block_type], synthesize, json_text=False)
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


class EventRewriter:
    """Rewrites parsed SSE events one by one; returns the bytes to emit for each."""

    _TEXT_KEY = ("text",)

    def __init__(
        self,
        make_text_stream: TextStreamFactory,
        *,
        max_channels: int = 1024,
        sensitive_keys: Collection[str] = DEFAULT_SENSITIVE_KEYS,
        memo: WholeTextMemo | None = None,
    ) -> None:
        self._channels = Channels(
            make_text_stream, max_channels=max_channels, sensitive_keys=sensitive_keys
        )
        self._whole = WholeText(make_text_stream, sensitive_keys, memo)
        self._shapes = (
            ChatCompletions(self._channels),
            Responses(self._channels),
            AnthropicMessages(self._channels),
        )

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._channels.counts + self._whole.counts)

    def rewrite(self, event: SseEvent) -> bytes:
        event = self._redacted_fields(event)
        comments = event.comments
        new_comments = [self._whole.redact(c) for c in comments]
        data = event.data
        before: list[bytes] = []
        new_data = data
        if data is not None:
            if data.startswith("[DONE]"):
                before = self._channels.flush_events(self._channels.open_keys())
                new_data = self._whole.redact(data)
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

    def _redacted_fields(self, event: SseEvent) -> SseEvent:
        """Lines other than data and comments (event, id, retry, unknown fields) reach the client
        too: each is redacted whole, field name included, before anything reads them."""
        lines = list(event.lines)
        changed = False
        for i, line in enumerate(lines):
            if line.field is None or line.field == "data":
                continue
            text = line.raw.decode("utf-8")  # the parser only yields valid UTF-8 lines
            new = self._whole.redact(text)
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
        except ValueError:
            return [], self._text(event, data)
        except RecursionError:
            raise SseUnsupportedEvent("SSE event JSON is nested too deeply") from None
        edit = Edit(event, payload)
        if self._TEXT_KEY in self._channels:
            edit.before += self._channels.flush_events([self._TEXT_KEY])
        if isinstance(payload, dict) and (payload.get("error") or payload.get("type") == "error"):
            edit.before += self._channels.flush_events(self._channels.open_keys())
        for shape in self._shapes:
            if shape.matches(payload):
                shape.rewrite(edit)
                break
        try:
            payload = self._walk(payload, edit)
        except RecursionError:
            raise SseUnsupportedEvent("SSE event JSON is nested too deeply") from None
        return edit.before, dump_json(payload) if edit.changed else data

    def _text(self, event: SseEvent, data: str) -> str:
        def synthesize(text: str) -> bytes:
            return format_event(text, event=event.event, id=event.id, eol=event.eol)

        return self._channels.feed(self._TEXT_KEY, data, synthesize, json_text=False)

    def _walk(self, node: Any, edit: Edit) -> Any:
        """Redact every string not handled by a channel (object keys too) as whole text."""
        count = not edit.repeat
        if isinstance(node, str):
            new = self._whole.redact(node, count=count)
            edit.changed |= new != node
            return new
        if isinstance(node, dict):
            for name, value in node.items():
                if (id(node), name) in edit.handled or name in OPAQUE_KEYS:
                    continue
                if isinstance(value, str):
                    json_text = name in JSON_TEXT_KEYS
                    new = self._whole.redact(value, json_text=json_text, count=count)
                    if new != value:
                        node[name] = new
                        edit.changed = True
                elif isinstance(value, dict | list):
                    self._walk(value, edit)
            self._rename_keys(node, edit)
        elif isinstance(node, list):
            for pos, value in enumerate(node):
                if isinstance(value, str | dict | list):
                    node[pos] = self._walk(value, edit)
        return node

    def _rename_keys(self, node: dict[str, Any], edit: Edit) -> None:
        """Keys can hold data too (a tool's input object); rename in place, keeping order."""
        if self._whole.memo.clean.issuperset(node):
            return  # the usual case, checked in one pass: every key is known to need nothing
        renamed: dict[str, str] = {}
        for name in node:
            new = self._whole.redact(name, count=not edit.repeat)
            if new != name:
                renamed[name] = new
        if renamed:
            items = [(renamed.get(name, name), value) for name, value in node.items()]
            node.clear()
            node.update(items)
            edit.changed = True
