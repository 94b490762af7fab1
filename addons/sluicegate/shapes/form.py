"""Form bodies as key-addressed fields: URL-encoded pairs and multipart/form-data parts.

A form field is a key-addressed value, like a JSON object's member: its name is the key, its
(decoded) value the string. Every inspector reads forms through this module, so a field is read
the same way by buffered redaction (`redaction/bodies.py`, the query string included), the policy's
body views and `redact_only`:

* `UrlEncodedForm` keeps each pair's raw spelling; a rewrite re-encodes only the pairs whose
  name or value changed, every other byte stays as sent.
* `MultipartForm` splits a multipart body into parts (headers, field name, file name, effective
  type, transfer encoding) with the delimiters kept byte for byte; a part's body is transfer-
  decoded for readers and encoded again as it came.
* `redact_field(strings, name, value)` is the one treatment of a text field: the inspector's
  `StringPolicy` (the gateway passes `redaction.json_redact.JsonStrings`, buffered JSON's own)
  says whether the name is a credential field (the rule pack's key rules, nothing else) and reads
  the value and the name whole (nested JSON in a value parsed as JSON). Bracketed names
  (`user[password]`, `auth[0][api_key]`) are the nested keys they spell: the innermost one is
  looked up too, as the same field nested in JSON would be.

This package imports no redaction code: errors are `FormError` with a stable code.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import quote_plus, unquote_plus

from sluicegate.shapes.channels import KeyRuleLike, StringPolicy

FORM_TYPE = "application/x-www-form-urlencoded"
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


class FormError(Exception):
    """A form that cannot be read safely; `code` is stable, the message holds no body data."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# -- fields and their treatment ---------------------------------------------------------------


def field_keys(name: str) -> tuple[str, ...]:
    """The keys a field name addresses: the name, and for a bracketed name (`a[b][c]`) the
    innermost non-numeric key, as the same value nested in JSON would sit under it."""
    segments = _BRACKETS.findall(name)
    if not segments or not name.endswith("]"):
        return (name,)
    inner = next((s for s in reversed(segments) if s and not s.isdigit()), None)
    return (name,) if inner is None or inner == name else (name, inner)


def key_rule(strings: StringPolicy, name: str) -> KeyRuleLike | None:
    """The key rule for a field named `name` (the name itself first, then its innermost key)."""
    for key in field_keys(name):
        rule = strings.key_rule(key)
        if rule is not None:
            return rule
    return None


def redact_field(
    strings: StringPolicy, name: str, value: str
) -> tuple[str, str, Mapping[str, int]]:
    """(name, value, counts) of one text field: a credential field's value masked whole by its
    key rule when the rule accepts it; otherwise the value read whole; the name read whole."""
    counts: Counter[str] = Counter()
    new_name, name_counts = strings.whole(name) if name else (name, {})
    counts.update(name_counts)
    rule = key_rule(strings, name) if name else None
    masked = strings.masked(rule, value) if rule is not None else None
    if masked is not None:
        new_value, value_counts = masked
    else:
        new_value, value_counts = strings.whole(value) if value else (value, {})
    counts.update(value_counts)
    return new_name, new_value, counts


# -- application/x-www-form-urlencoded --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FormPair:
    """One `name=value` pair: decoded, and as sent (`sep` is "" for a pair without `=`)."""

    name: str
    value: str
    raw: str
    sep: str


class UrlEncodedForm:
    """A URL-encoded form (or query string) as its pairs, in order, duplicates kept.

    Decoding uses the body's charset; bytes that do not decode survive as surrogate escapes, so a
    pair written back unchanged is byte-identical and a changed one keeps its other bytes.
    """

    def __init__(self, pairs: list[FormPair], codec: str) -> None:
        self.pairs = pairs
        self.codec = codec

    @classmethod
    def parse(cls, text: str, codec: str = "utf-8") -> UrlEncodedForm:
        pairs = []
        for raw in text.split("&"):
            raw_name, sep, raw_value = raw.partition("=")
            pairs.append(
                FormPair(
                    unquote_plus(raw_name, encoding=codec, errors="surrogateescape"),
                    unquote_plus(raw_value, encoding=codec, errors="surrogateescape"),
                    raw,
                    sep,
                )
            )
        return cls(pairs, codec)

    def fields(self) -> Iterator[tuple[str, str]]:
        for pair in self.pairs:
            yield pair.name, pair.value

    def rewrite(self, change: Callable[[str, str], tuple[str, str] | None]) -> str:
        """The form with each pair `change` returns a new (name, value) for re-encoded; the
        others exactly as they were sent."""
        out = []
        for pair in self.pairs:
            new = change(pair.name, pair.value)
            if new is None or new == (pair.name, pair.value):
                out.append(pair.raw)
            else:
                sep = pair.sep or ("=" if new[1] else "")
                out.append(self.quote(new[0]) + sep + self.quote(new[1]))
        return "&".join(out)

    def quote(self, text: str) -> str:
        return quote_plus(text, safe="", encoding=self.codec, errors="surrogateescape")


def redact_urlencoded(
    text: str, codec: str, strings: StringPolicy
) -> tuple[str, Mapping[str, int]]:
    """A URL-encoded form with every field through `redact_field`; changed pairs re-encoded."""
    counts: Counter[str] = Counter()

    def change(name: str, value: str) -> tuple[str, str] | None:
        new_name, new_value, found = redact_field(strings, name, value)
        counts.update(found)
        return (new_name, new_value) if found else None

    new = UrlEncodedForm.parse(text, codec).rewrite(change)
    return (new if counts else text), counts


# -- multipart ----------------------------------------------------------------------------------

MAX_DEPTH = 2
_PART_HEAD_END = b"\r\n\r\n"
_DISPOSITION_PARAM = re.compile(r';\s*([\w*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')
_PLAIN_TRANSFERS = ("", "7bit", "8bit", "binary")


@dataclass(frozen=True, slots=True)
class Part:
    """One part of a multipart body: where it sits, and what its headers say."""

    head_start: int
    body_start: int
    body_end: int
    headers: Mapping[str, str]

    @property
    def name(self) -> str | None:
        return disposition_param(self.headers.get("content-disposition", ""), "name")

    @property
    def filename(self) -> str | None:
        return disposition_param(self.headers.get("content-disposition", ""), "filename")

    @property
    def content_type(self) -> str:
        """The part's type; without one, RFC 7578: text/plain for a field, and a file is
        binary (application/octet-stream)."""
        declared = self.headers.get("content-type")
        if declared is not None:
            return declared
        return "application/octet-stream" if self.filename is not None else "text/plain"

    @property
    def transfer(self) -> str:
        return self.headers.get("content-transfer-encoding", "").strip().lower()


class MultipartForm:
    """A multipart body split into parts; the bytes between part bodies (delimiters, part
    headers, preamble, epilogue) are `framing` segments, kept as sent unless redacted."""

    def __init__(self, body: bytes, boundary: str, parts: list[Part]) -> None:
        self.body = body
        self.boundary = boundary
        self.parts = parts

    @classmethod
    def parse(cls, body: bytes, boundary: str | None) -> MultipartForm:
        if not boundary:
            raise FormError("multipart_no_boundary", "multipart body without a boundary")
        delimiter = b"--" + boundary.encode("latin-1")
        return cls(body, boundary, _split(body, delimiter))

    def part_body(self, part: Part) -> bytes:
        """A part's body as its receiver reads it (transfer encoding decoded)."""
        raw = self.body[part.body_start : part.body_end]
        if part.transfer in _PLAIN_TRANSFERS:
            return raw
        if part.transfer == "quoted-printable":
            return quopri.decodestring(raw)
        if part.transfer == "base64":
            try:
                return base64.b64decode(b"".join(raw.split()), validate=True)
            except (binascii.Error, ValueError):
                raise FormError("multipart_malformed", "a base64 part does not decode") from None
        raise FormError(
            "multipart_transfer_encoding", "a multipart part's transfer encoding is unknown"
        )

    def encoded(self, part: Part, data: bytes) -> bytes:
        """`data` encoded again as `part` came (base64 lines of 76 if it had line breaks)."""
        original = self.body[part.body_start : part.body_end]
        if part.transfer in _PLAIN_TRANSFERS:
            return data
        if part.transfer == "quoted-printable":
            encoded = quopri.encodestring(data)
            return encoded.replace(b"\n", b"\r\n") if b"\r\n" in original else encoded
        encoded = base64.b64encode(data)
        if b"\n" not in original.strip():
            return encoded
        return b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))

    def rebuild(
        self, bodies: Mapping[int, bytes], framing: Callable[[bytes], bytes] = lambda b: b
    ) -> bytes:
        """The body with the parts at the indexes of `bodies` replaced (already transfer-
        encoded) and every framing segment passed through `framing`."""
        out: list[bytes] = []
        cursor = 0
        for index, part in enumerate(self.parts):
            out.append(framing(self.body[cursor : part.body_start]))
            out.append(bodies.get(index, self.body[part.body_start : part.body_end]))
            cursor = part.body_end
        out.append(framing(self.body[cursor:]))
        return b"".join(out)


def _split(body: bytes, delimiter: bytes) -> list[Part]:
    """The parts of a multipart body; raises `FormError` on a malformed one."""
    if body.startswith(delimiter):
        position = 0
    else:
        position = body.find(b"\r\n" + delimiter)
        if position < 0:
            raise FormError("multipart_malformed", "multipart boundary not found")
        position += 2
    parts: list[Part] = []
    while True:
        after = position + len(delimiter)
        if body[after : after + 2] == b"--":
            return parts  # closing delimiter; the epilogue stays as it is
        if body[after : after + 2] != b"\r\n":
            raise FormError("multipart_malformed", "bad multipart delimiter line")
        head_start = after + 2
        if body.startswith(b"\r\n", head_start):
            head_end = head_start - 2  # a part without headers
        else:
            head_end = body.find(_PART_HEAD_END, head_start)
        if head_end < 0:
            raise FormError("multipart_malformed", "multipart part without header end")
        body_start = head_end + len(_PART_HEAD_END)
        next_delimiter = body.find(b"\r\n" + delimiter, body_start)
        if next_delimiter < 0:
            raise FormError("multipart_malformed", "multipart body not terminated")
        headers = _part_headers(body[head_start:body_start])
        parts.append(Part(head_start, body_start, next_delimiter, headers))
        position = next_delimiter + 2


def _part_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def disposition_param(disposition: str, name: str) -> str | None:
    for match in _DISPOSITION_PARAM.finditer(disposition):
        if match.group(1).lower() == name:
            quoted = match.group(2)
            return quoted.replace('\\"', '"') if quoted is not None else match.group(3)
    return None


def text_fields(
    body: bytes, content_type_params: Mapping[str, str], *, is_text: Callable[[str], bool]
) -> Iterator[tuple[str, str]]:
    """(name, value) of a multipart body's text parts (`is_text(part type)`), values decoded by
    their charset (UTF-8 by default, latin-1 for bytes that do not decode); parts that cannot
    be read are skipped. For readers that only look (policy views)."""
    try:
        form = MultipartForm.parse(body, content_type_params.get("boundary"))
    except FormError:
        return
    for part in form.parts:
        if not is_text(part.content_type):
            continue
        try:
            data = form.part_body(part)
        except FormError:
            continue
        charset = _param(part.content_type, "charset") or "utf-8"
        try:
            value = data.decode(charset)
        except (LookupError, UnicodeDecodeError):
            value = data.decode("latin-1")
        yield part.name or "", value


def _param(content_type: str, name: str) -> str | None:
    for param in content_type.split(";")[1:]:
        key, sep, value = param.partition("=")
        if sep and key.strip().lower() == name:
            return value.strip().strip('"')
    return None
