"""Where text lives: typed text channels, and what an inspector supplies to read them.

Every inspection path (buffered and streamed redaction, WebSocket messages, the policy scanners)
reads content through this model, so a string is treated the same whichever path it took:

* A *channel* is one logical text that arrives in pieces (a message's deltas, a tool call's
  arguments, a reasoning trace). Its `Role` says how to read it: `TEXT` (prose, code), `JSON_TEXT`
  (JSON that arrives in fragments: tool-call arguments, `partial_json`) or `OPAQUE` (cryptographic
  fields that only break when rewritten: signatures, `encrypted_content`).
* Every other string is *key-addressed*: a value under an object key, or the key itself. Which
  keys are sensitive is the rule pack's key rules and nothing else: the inspector passes a
  `StringPolicy` that answers for a key, and does whole-string inspection (nested JSON included).

This package imports no redaction or policy code: an inspector supplies the `TextStream` factory
(what reads a channel piece by piece) and the `StringPolicy` (what reads a whole string).
"""

from __future__ import annotations

import enum
import json
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sluicegate.shapes.sse import SseError, SseEvent, format_event


class Role(enum.Enum):
    """How a channel's text is read."""

    TEXT = "text"
    JSON_TEXT = "json_text"
    OPAQUE = "opaque"


class TextStream(Protocol):
    """One text channel's incremental reader (the redactor's `StreamRedactor`, or a verbatim
    copy when only the text is wanted). `feed` returns what may be released now."""

    def feed(self, text: str) -> str: ...
    def flush(self) -> str: ...


TextStreamFactory = Callable[[], TextStream]


class KeyRuleLike(Protocol):
    """A rule that masks values of credential-named fields (`redaction.rules.KeyRule`)."""

    @property
    def id(self) -> str: ...

    def accepts_value(self, value: str) -> bool: ...


class StringPolicy(Protocol):
    """What a whole string (and a key-addressed value) becomes: supplied by the inspector.

    The buffered JSON redactor implements it (`redaction.json_redact.JsonStrings`), so a string
    read from a stream or a WebSocket message gets exactly what the same string gets in a buffered
    body: the same key rules, the same tags, nested JSON parsed the same way.
    """

    def key_rule(self, name: str) -> KeyRuleLike | None:
        """The key rule for a field named `name` (None: not a credential field)."""
        ...

    def masked(self, rule: KeyRuleLike, value: str) -> tuple[str, Mapping[str, int]] | None:
        """The tag for `value` under `rule`'s field, or None when the value is no credential."""
        ...

    def whole(self, text: str) -> tuple[str, Mapping[str, int]]:
        """A complete string value as buffered JSON treats it (nested JSON documents parsed)."""
        ...

    def opaque(self, text: str) -> tuple[str, Mapping[str, int]]:
        """An opaque field (a signature): the flow's literal secrets only, never the rules."""
        ...

    def walk(
        self, node: Any, skip: Callable[[Any, Hashable], bool], *, count: bool
    ) -> tuple[Any, bool, Mapping[str, int]]:
        """Redact a parsed JSON value in place of buffered JSON (key rules, example sections,
        nested documents), leaving the (container, key) pairs `skip` names alone."""
        ...


def stream_counts(stream: object) -> Mapping[str, int]:
    counts = getattr(stream, "counts", None)
    return counts if isinstance(counts, Mapping) else {}


class TooManyChannels(SseError):
    code = "sse_too_many_channels"


class UnsupportedEvent(SseError):
    code = "sse_unsupported_event"


# --- open channels -------------------------------------------------------------------------------


@dataclass(slots=True)
class Channel:
    stream: TextStream
    role: Role
    synthesize: Callable[[str], bytes]  # an event of the channel's shape carrying flushed text


class Channels:
    """Open text channels by key, in opening order, with a cap on how many may be open.

    Every piece of text a channel releases is also appended to `released`, in release order:
    the generated text of the stream as the client gets it, which the response policy reads
    (`take_released`) without parsing the events again.
    """

    def __init__(
        self,
        make_text_stream: TextStreamFactory,
        make_json_stream: TextStreamFactory,
        *,
        max_channels: int,
    ) -> None:
        self._make = make_text_stream
        self._make_json = make_json_stream  # for JSON_TEXT channels (shapes/json_stream.py)
        self._max = max_channels
        self._open: dict[Hashable, Channel] = {}
        self._finished: Counter[str] = Counter()
        self.released: list[str] = []

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

    def take_released(self) -> str:
        text = "".join(self.released)
        self.released.clear()
        return text

    def feed(self, key: Hashable, text: str, synthesize: Callable[[str], bytes], role: Role) -> str:
        channel = self._open.get(key)
        if channel is None:
            if len(self._open) >= self._max:
                raise TooManyChannels(f"more than {self._max} text channels open at once")
            channel = self._open[key] = Channel(self._stream(role), role, synthesize)
        else:
            channel.synthesize = synthesize
        out = channel.stream.feed(text)
        if out:
            self.released.append(out)
        return out

    def _stream(self, role: Role) -> TextStream:
        return self._make_json() if role is Role.JSON_TEXT else self._make()

    def flush(self, key: Hashable) -> str:
        channel = self._open.pop(key, None)
        if channel is None:
            return ""
        text = channel.stream.flush()
        self._finished.update(stream_counts(channel.stream))
        if text:
            self.released.append(text)
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


# --- one event being rewritten -------------------------------------------------------------------


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
        """A field of role OPAQUE (or one written by an adapter): nothing reads or rewrites it."""
        self.handled.add((id(container), key))

    def skipped(self, container: Any, key: Hashable) -> bool:
        return (id(container), key) in self.handled


class Adapter(Protocol):
    """One provider's event shapes (shapes/providers/): which fields are channels, when they end."""

    def matches(self, payload: Any) -> bool: ...
    def rewrite(self, edit: Edit) -> None: ...


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


def str_field(value: Any) -> str | None:
    """A field that should be a string, or None: event JSON is upstream-controlled, and a list
    where a type name belongs must not crash a lookup."""
    return value if isinstance(value, str) else None


def key_part(value: Any) -> Hashable:
    return value if value is None or isinstance(value, str | int | float) else repr(value)


_MUST_ESCAPE = re.compile(r'["\\\x00-\x1f\ud800-\udfff]')
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def encode_json_chars(text: str) -> str:
    """`text` as JSON string content: minimal escapes, lone surrogates as `\\uXXXX`."""
    return _MUST_ESCAPE.sub(_escape_char, text)


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT_ESCAPES.get(char) or f"\\u{ord(char):04x}"
