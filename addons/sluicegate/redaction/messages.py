"""WebSocket text messages of one direction read as one stream, so a secret split across messages
is found (issue 14).

Each message is redacted whole (as a body: `redact`, the caller's, or the text redactor), and its
*stream text*, read from the message as it arrived, goes to a stream:

  * a message that is not a JSON object (plain text, a line, a JSON scalar or array): the whole
    message;
  * a JSON object with a string `delta` (OpenAI realtime `response.text.delta`,
    `response.audio_transcript.delta`, `response.function_call_arguments.delta`...): the delta,
    one stream per (type, item, output and content index); `*audio.delta` is audio, not text;
  * a JSON object whose `delta` object has a string `text`, `thinking` or `partial_json`
    (Anthropic `content_block_delta`): that string, one stream per (index, delta type);
  * a JSON object whose keys repeat: the whole message (a parser may read either value);
  * any other JSON object: nothing (it is redacted whole, and waits only for the messages
    before it, to keep the order).

Each stream is read by a `StreamRedactor` whose segments are the messages (`mark`). A message
whose stream text the redactor still holds back (its tail could become a secret with what comes
next) is *held*: it is not released until a later message of its stream decides it, or `flush`
(the caller's timer) decides it with what it has. Messages are released in arrival order: a
decided message waits behind a held one. A finding across two messages is a split secret: the
stream fails with `SPLIT` and releases nothing more (the caller closes the connection; no part of
the secret was released, the head is held). A finding inside one message that only the text
around it revealed is tagged in it: the message is rebuilt with the stream's output and redacted
whole again. Otherwise the message is released as redacted whole.

The stream reads the messages as they arrived, not their redacted form: redacting a message
alone decides its end too early (`TOKEN=MTk4Nj` at the end of a message is a short value, tagged,
and a tag ends every match), which would let the rest of the value out in the next message.

`flush` releases every waiting message as a copy of its stream would if the stream ended there
(`StreamRedactor.fork`), and the stream goes on: when it later decides those messages, what it
would release must be what was released. If not (a secret whose head went out when the timer
fired and whose rest arrives now, or a value the text after it shows to be a secret) the stream
fails with `SPLIT`, so the rest never leaves. More than `max_messages` or `max_bytes` waiting
fails with `OVERFLOW` (`overflow="close"`) or is released like a `flush`
(`overflow="release"`): a rule that may match hundreds of characters (an XML credential element
holds up to 400) keeps clean realtime text of ~4-character deltas waiting for over 64 messages.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from sluicegate.redaction.redactor import OVERFLOW_RULE_ID, Redactor, StreamRedactor

SPLIT: Final = "websocket_secret_split"
OVERFLOW: Final = "websocket_hold_overflow"
# Streams kept per direction; past it the least recent idle one is forgotten.
MAX_STREAMS: Final = 64
_DELTA_FIELDS: Final = ("text", "thinking", "partial_json")

Rebuild = Callable[[str], str]


@dataclass(frozen=True)
class StreamText:
    """Where a message's stream text is: the stream's key, the text, how to put it back."""

    key: Hashable
    text: str
    rebuild: Rebuild


def _whole(text: str) -> str:
    return text


def stream_text(message: str) -> StreamText | None:
    """The stream text of a (redacted) text message; None when it adds nothing to a stream."""
    if not message.lstrip().startswith("{"):
        return StreamText(("text",), message, _whole)
    repeated = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal repeated
        obj = dict(items)
        repeated = repeated or len(obj) != len(items)
        return obj

    try:
        obj = json.loads(message, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return StreamText(("text",), message, _whole)
    if repeated:
        return StreamText(("text",), message, _whole)
    if not isinstance(obj, dict):
        return StreamText(("text",), message, _whole)
    delta = obj.get("delta")
    kind = obj.get("type")
    kind_key = kind if isinstance(kind, str) else None
    if isinstance(delta, str):
        if kind_key is not None and kind_key.endswith("audio.delta"):
            return None  # base64 audio
        key = ("delta", kind_key, *(_plain(obj.get(k)) for k in _DELTA_INDEXES))
        return StreamText(key, delta, _setter(obj, obj, "delta"))
    if isinstance(delta, dict):
        for name in _DELTA_FIELDS:
            value = delta.get(name)
            if isinstance(value, str):
                key = ("delta-object", _plain(obj.get("index")), _plain(delta.get("type")), name)
                return StreamText(key, value, _setter(obj, delta, name))
    return None


_DELTA_INDEXES: Final = ("item_id", "response_id", "output_index", "content_index", "call_id")


def _plain(value: object) -> Hashable:
    return value if isinstance(value, (str, int, float, bool)) or value is None else repr(value)


def _setter(root: dict[str, Any], holder: dict[str, Any], name: str) -> Rebuild:
    def rebuild(text: str) -> str:
        holder[name] = text
        return json.dumps(root, ensure_ascii=False)

    return rebuild


@dataclass
class Released:
    """A message the stream let go, in arrival order: `text` is what may be sent."""

    seq: int
    text: str
    changed: bool
    waited: bool  # it was held (not released as it arrived)


@dataclass
class Outcome:
    released: list[Released] = field(default_factory=list)
    held: bool = False  # the message just pushed is waiting
    failure: str | None = None  # SPLIT or OVERFLOW: release nothing more, close
    rules: tuple[str, ...] = ()  # the rules of a split secret


@dataclass
class _Entry:
    seq: int
    message: str  # as it arrived
    redacted: str  # redacted whole
    size: int
    found: StreamText | None
    decided: bool = False
    out: str | None = None  # the released stream text


@dataclass
class _Stream:
    redactor: StreamRedactor
    waiting: deque[_Entry] = field(default_factory=deque)  # undecided, in order
    # Messages a flush released before the stream decided them: what was released, in order.
    early: deque[str] = field(default_factory=deque)


class MessageStream:
    """The text messages of one direction of one WebSocket (see the module docstring)."""

    def __init__(
        self,
        redactor: Redactor,
        *,
        redact: Callable[[str], str] | None = None,
        max_messages: int = 64,
        max_bytes: int = 16 << 20,
        overflow: Literal["close", "release"] = "close",
    ) -> None:
        self._redactor = redactor
        self._redact = redact or (lambda text: redactor.redact_text(text).text)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.overflow = overflow
        self.forced = 0  # releases forced by the bounds (overflow="release")
        self._streams: OrderedDict[Hashable, _Stream] = OrderedDict()
        self._queue: deque[_Entry] = deque()  # every message not released yet, in order
        self._bytes = 0
        self._seq = 0
        self.failed: str | None = None
        self.counts: dict[str, int] = {}
        self.held = 0  # messages that had to wait

    @property
    def pending(self) -> int:
        """Messages waiting."""
        return len(self._queue)

    def push(self, message: str, redacted: str | None = None, size: int | None = None) -> Outcome:
        """Read one text message as it arrived (`redacted`: the caller redacted it whole already);
        what may be released now, in order."""
        if self.failed is not None:
            return Outcome(failure=self.failed)
        seq = self._seq
        self._seq += 1
        found = stream_text(message)
        if redacted is None:
            redacted = self._redact(message)
        size = len(message.encode()) if size is None else size
        entry = _Entry(seq, message, redacted, size, found)
        self._queue.append(entry)
        self._bytes += entry.size
        if found is None:
            entry.decided = True
        else:
            stream = self._stream(found.key)
            stream.waiting.append(entry)
            stream.redactor.feed(found.text)
            stream.redactor.mark()
            failed = self._collect(stream)
            if failed is not None:
                return failed
        if self.pending > self.max_messages or self._bytes > self.max_bytes:
            if self.overflow == "close":
                return self._fail(OVERFLOW)
            self.forced += 1
            forced = self.flush()
            forced.held = False
            return forced
        outcome = self._release(current=seq)
        outcome.held = not any(r.seq == seq for r in outcome.released)
        if outcome.held:
            self.held += 1
        return outcome

    def flush(self) -> Outcome:
        """Decide every waiting message with what its stream has (the hold timer fired)."""
        if self.failed is not None:
            return Outcome(failure=self.failed)
        for stream in self._streams.values():
            if not stream.waiting:
                continue
            twin = stream.redactor.fork()
            twin.flush()
            if twin.crossings:
                return self._fail(SPLIT, tuple(sorted(set(twin.crossings))))
            segments = twin.take_segments()
            early, segments = segments[: len(stream.early)], segments[len(stream.early) :]
            if early != list(stream.early):  # the timer let out what is a secret
                return self._fail(SPLIT, tuple(sorted(twin.counts)) or (SPLIT,))
            for entry, text in zip(stream.waiting, segments, strict=True):
                entry.out = text
                entry.decided = True
                stream.early.append(text)
            stream.waiting.clear()
        return self._release(current=None)

    def _stream(self, key: Hashable) -> _Stream:
        stream = self._streams.get(key)
        if stream is None:
            if len(self._streams) >= MAX_STREAMS:
                idle = next(
                    (k for k, s in self._streams.items() if not s.waiting and not s.early), None
                )
                if idle is not None:
                    del self._streams[idle]
            stream = self._streams[key] = self._new_stream()
        else:
            self._streams.move_to_end(key)
        return stream

    def _new_stream(self) -> _Stream:
        redactor = self._redactor.stream(self.max_bytes + 1, segments=True)
        return _Stream(redactor)

    def _collect(self, stream: _Stream) -> Outcome | None:
        """Give finished segments to their messages; the failure of a split secret or overflow."""
        redactor = stream.redactor
        for text in redactor.take_segments():
            if stream.early:
                if text != stream.early.popleft():  # the timer let out what is a secret
                    return self._fail(SPLIT, tuple(sorted(redactor.counts)) or (SPLIT,))
                continue
            entry = stream.waiting.popleft()
            entry.out = text
            entry.decided = True
        if redactor.crossings:
            return self._fail(SPLIT, tuple(sorted(set(redactor.crossings))))
        if OVERFLOW_RULE_ID in redactor.counts:
            return self._fail(OVERFLOW)
        for rule, n in redactor.counts.items():
            self.counts[rule] = self.counts.get(rule, 0) + n
        redactor.counts.clear()
        return None

    def _release(self, current: int | None) -> Outcome:
        outcome = Outcome()
        while self._queue and self._queue[0].decided:
            entry = self._queue.popleft()
            self._bytes -= entry.size
            text = entry.redacted
            found = entry.found
            if found is not None and entry.out is not None and entry.out != found.text:
                text = self._redact(found.rebuild(entry.out))
            changed = text != entry.message
            waited = entry.seq != current
            outcome.released.append(Released(entry.seq, text, changed, waited))
        return outcome

    def _fail(self, code: str, rules: tuple[str, ...] = ()) -> Outcome:
        self.failed = code
        self._queue.clear()
        self._streams.clear()
        self._bytes = 0
        return Outcome(failure=code, rules=rules)
