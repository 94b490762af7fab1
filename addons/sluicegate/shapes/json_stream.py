"""JSON text that arrives in fragments (tool-call arguments, `partial_json`), read as it streams.

Outside strings, structure passes straight through; bare tokens (numbers, literals, or garbage if
the text is not JSON) go through a text stream of their own. Inside a string literal, escapes are
decoded (even when an escape or a surrogate pair is split across fragments), the DECODED characters
feed one text stream per string, and what it releases is re-encoded as JSON string content. So a
secret survives in no escaped form (`sk\\u002d...`, `\\/`), and valid JSON in gives valid JSON out.

Two kinds of string are held whole and handed to the `StringPolicy`, so they come out exactly as
the same JSON redacted buffered would: a value under a credential-named key (the rule pack's key
rules decide, outside `example(s)` sections, like buffered JSON) and a string that starts like a
JSON document (buffered JSON parses nested documents). Held strings are bounded (`MAX_HELD`):
past it a nested document streams on as text, and a credential field's value fails the stream
(`UnsupportedEvent`: it can be neither judged nor passed).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from sluicegate.shapes.channels import (
    KeyRuleLike,
    StringPolicy,
    TextStream,
    TextStreamFactory,
    UnsupportedEvent,
    encode_json_chars,
    stream_counts,
)

_STRING_SPECIAL = re.compile(r'["\\]')
_STRUCTURE = re.compile(r"[{}\[\],:]")
_PLAIN_OUTSIDE = " \t\r\n{}[],:"  # structure that never needs redaction
_ESCAPED = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")
_MAX_KEY = 256
_MAX_DEPTH = 256
MAX_HELD = 64 * 1024  # characters of one string held whole
# Keys whose value documents example data: key rules do not apply below them (as buffered).
EXAMPLE_KEYS = frozenset({"example", "examples", "x-example", "x-examples"})


@dataclass(slots=True)
class _Frame:
    is_object: bool
    example: bool  # inside an example section: no key rules
    rule: KeyRuleLike | None  # an array under a credential field: its strings are that field's


class JsonTextStream:
    """A TextStream over JSON text that arrives in arbitrary fragments (see the module doc)."""

    def __init__(
        self, make_text_stream: TextStreamFactory, strings: StringPolicy | None = None
    ) -> None:
        self._make = make_text_stream
        self._strings = strings
        self._string: TextStream | None = None  # the open string's stream; None while held
        self._held: list[str] | None = None  # the open string's text, when held whole
        self._held_rule: KeyRuleLike | None = None
        self._held_size = 0
        self._in_string = False
        self._escape = ""  # raw characters of an incomplete escape, from the backslash
        self._high = ""  # a decoded high surrogate waiting for its low half
        self._bare: TextStream | None = None
        self._finished: Counter[str] = Counter()
        # Structure, tracked to know which key a string value belongs to.
        self._frames: list[_Frame] = []
        self._expect_key = False
        self._after_colon = False
        self._is_key = False
        self._key = ""
        self._last_key = ""
        self._first = True  # no character of the open string seen yet

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
        if self._strings is not None:
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
                self._open_container(char == "{")
            elif char in "}]":
                if self._frames:
                    self._frames.pop()
                self._expect_key = False
                self._after_colon = False
            elif char == ",":
                self._expect_key = bool(self._frames) and self._frames[-1].is_object
                self._after_colon = False
            else:  # ":"
                self._expect_key = False
                self._after_colon = True
        if len(self._frames) > _MAX_DEPTH:  # too deep to follow: mask nothing by key, say so
            self._strings = None

    def _open_container(self, is_object: bool) -> None:
        parent = self._frames[-1] if self._frames else None
        example = parent.example if parent is not None else False
        rule = None
        if parent is not None and parent.is_object and self._after_colon:
            example = example or self._last_key.lower() in EXAMPLE_KEYS
            if not is_object and not example:
                rule = self._rule(self._last_key)
        elif parent is not None and not parent.is_object and not is_object:
            rule = parent.rule  # nested arrays under a credential field stay that field's
        self._frames.append(_Frame(is_object, example, rule))
        self._expect_key = is_object
        self._after_colon = False

    def _rule(self, key: str) -> KeyRuleLike | None:
        strings = self._strings
        return strings.key_rule(key) if strings is not None else None

    def _value_rule(self) -> KeyRuleLike | None:
        """The key rule a string value opened now falls under, if any."""
        if not self._frames:
            return None
        frame = self._frames[-1]
        if frame.example:
            return None
        if frame.is_object:
            return self._rule(self._last_key) if self._after_colon else None
        return frame.rule

    def _open_string(self) -> None:
        self._in_string = True
        top = self._frames[-1] if self._frames else None
        self._is_key = self._expect_key and top is not None and top.is_object
        self._key = ""
        self._first = True
        self._held_rule = None if self._is_key else self._value_rule()
        self._after_colon = False
        if self._held_rule is not None:
            self._held, self._held_size, self._string = [], 0, None
        else:
            self._held, self._string = None, self._make()

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
        if self._first:
            self._first = False
            if (
                self._held is None
                and not self._is_key
                and self._strings is not None
                and text.lstrip()[:1] in ("{", "[")
            ):
                self._held, self._held_size, self._string = [], 0, None  # maybe a document
        if self._held is not None:
            self._held.append(text)
            self._held_size += len(text)
            if self._held_size > MAX_HELD:
                if self._held_rule is not None:  # fail closed: cannot be judged, cannot pass
                    raise UnsupportedEvent("a credential field's value is too long to inspect")
                self._stream_held(out)  # too long to hold as a document: stream on as text
            return
        if self._string is not None:
            out.append(encode_json_chars(self._string.feed(text)))

    def _stream_held(self, out: list[str]) -> None:
        assert self._held is not None
        text = "".join(self._held)
        self._held, self._string = None, self._make()
        out.append(encode_json_chars(self._string.feed(text)))

    def _close_string(self, decoded: list[str], out: list[str], *, closed: bool) -> None:
        if self._high:
            decoded.append(self._high)
            self._high = ""
        self._release(decoded, out)
        if self._held is not None:
            out.append(encode_json_chars(self._whole("".join(self._held))))
        elif self._string is not None:
            out.append(encode_json_chars(self._string.flush()))
            self._finished.update(stream_counts(self._string))
        if self._is_key:
            self._last_key = self._key if len(self._key) <= _MAX_KEY else ""
            self._expect_key = False
        self._string = None
        self._held = None
        self._in_string = False
        if closed:
            out.append('"')

    def _whole(self, value: str) -> str:
        strings = self._strings
        assert strings is not None
        rule = self._held_rule
        if rule is not None:
            result = strings.masked(rule, value)
            if result is not None:
                self._finished.update(result[1])
                return result[0]
        text, counts = strings.whole(value)
        self._finished.update(counts)
        return text
