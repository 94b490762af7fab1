"""Redaction of a whole HTTP body that is already content-decoded (no gzip/br/zstd here).

The body is classified by its Content-Type: JSON (also `+json` and JSON lines), text (text/*,
XML, JavaScript, YAML...), URL-encoded forms, multipart forms, binary, or unknown. Text is
decoded with the declared charset (UTF-8 by default); bytes that do not decode are read as
latin-1 instead, which maps every byte to one character, so ASCII secrets are still found
and every other byte is written back unchanged. Bodies that cannot be redacted are passed or
refused according to `BodyPolicy`; a refusal raises `BodyRefused` with a stable code.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
import string
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote_plus, unquote_plus

from sluicegate.redaction.json_redact import JsonRedactionError, redact_json_text
from sluicegate.redaction.memo import TextRedactor, key_rule_for
from sluicegate.redaction.redactor import TAG_PATTERN

Kind = Literal["empty", "json", "jsonl", "text", "form", "multipart", "binary", "unknown"]

_JSON_TYPES = {"application/json", "text/json", "application/json-seq"}
_JSONL_TYPES = {
    "application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonl",
    "application/jsonlines", "application/x-jsonlines",
}  # fmt: skip
_TEXT_TYPES = {
    "application/xml", "application/javascript", "application/ecmascript",
    "application/x-javascript", "application/yaml", "application/x-yaml", "application/toml",
    "application/sql", "application/graphql", "application/x-sh", "application/x-httpd-php",
    "application/xhtml+xml", "application/csv",
}  # fmt: skip
_BINARY_PREFIXES = ("image/", "audio/", "video/", "font/", "model/")
_BINARY_TYPES = {
    "application/octet-stream", "application/pdf", "application/zip", "application/gzip",
    "application/x-gzip", "application/x-tar", "application/x-7z-compressed",
    "application/x-bzip2", "application/zstd", "application/x-protobuf",
    "application/protobuf", "application/grpc", "application/wasm", "application/msgpack",
    "application/x-msgpack", "application/cbor", "application/vnd.apache.parquet",
    "application/x-sqlite3", "application/java-archive",
}  # fmt: skip
_MULTIPART_DEPTH = 2


class BodyRefused(Exception):
    """The body must not be forwarded; `code` is stable, `message` never holds body data."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class BodyPolicy:
    # Bodies that cannot hold redactable text (images, archives, protobuf...).
    binary: Literal["pass", "block"] = "block"
    # No or unrecognised Content-Type: redact as text (trying JSON first), pass or block.
    unknown: Literal["text", "pass", "block"] = "text"


@dataclass(frozen=True)
class BodyResult:
    body: bytes
    changed: bool
    counts: dict[str, int] = field(default_factory=dict)
    kind: Kind = "text"


def media_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    """("type/subtype" lowercased, parameters) of a Content-Type header value."""
    if not content_type:
        return "", {}
    media, *params = content_type.split(";")
    parameters: dict[str, str] = {}
    for param in params:
        name, sep, value = param.partition("=")
        if sep:
            parameters[name.strip().lower()] = value.strip().strip('"')
    return media.strip().lower(), parameters


def classify(content_type: str | None) -> Kind:
    media, _ = media_type(content_type)
    if not media:
        return "unknown"
    if media in _JSON_TYPES or media.endswith("+json"):
        return "json"
    if media in _JSONL_TYPES:
        return "jsonl"
    if media == "application/x-www-form-urlencoded":
        return "form"
    if media == "multipart/form-data":
        return "multipart"
    if media.startswith("text/") or media in _TEXT_TYPES or media.endswith("+xml"):
        return "text"
    if media.startswith(_BINARY_PREFIXES) or media in _BINARY_TYPES:
        return "binary"
    return "unknown"


def redact_body(
    body: bytes, content_type: str | None, redactor: TextRedactor, policy: BodyPolicy
) -> BodyResult:
    return _redact(body, content_type, redactor, policy, depth=0)


def _redact(
    body: bytes, content_type: str | None, redactor: TextRedactor, policy: BodyPolicy, depth: int
) -> BodyResult:
    if not body:
        return BodyResult(body, False, {}, "empty")
    kind = classify(content_type)
    if kind == "binary":
        if policy.binary == "block":
            raise BodyRefused("binary_body_blocked", "binary bodies cannot be redacted")
        return BodyResult(body, False, {}, "binary")
    if kind == "unknown":
        if policy.unknown == "block":
            raise BodyRefused("unknown_body_blocked", "body type unknown, cannot be redacted")
        if policy.unknown == "pass":
            return BodyResult(body, False, {}, "unknown")
    _, params = media_type(content_type)
    if kind == "multipart":
        return _redact_multipart(body, params, redactor, policy, depth)
    text, codec = _decode(body, params.get("charset"))
    new_text, counts, kind = _redact_text(text, kind, codec, redactor)
    new_body = _encode(new_text, codec, kind) if counts else body
    if not _ascii_compatible(codec):
        # Most receivers read the bytes as UTF-8 whatever the label says: check that view too.
        view, view_codec = _decode(new_body, None)
        if _redact_text(view, kind, view_codec, redactor)[1]:
            raise BodyRefused(
                "charset_mismatch", "the declared charset hides text that UTF-8 readers see"
            )
    return BodyResult(new_body, bool(counts), counts, kind)


def _redact_text(
    text: str, kind: Kind, codec: str, redactor: TextRedactor
) -> tuple[str, dict[str, int], Kind]:
    """Redacted text, counts, and the kind found (JSON that does not parse is text)."""
    if kind == "form":
        new_text, counts = _redact_form(text, codec, redactor)
    elif kind == "jsonl":
        new_text, counts = _redact_lines(text, redactor)
    else:
        new_text, counts, parsed = _redact_json_or_text(text, redactor, try_json=kind != "text")
        if kind == "unknown" and parsed:
            kind = "json"
        elif kind == "json" and not parsed:
            kind = "text"
    return new_text, counts, kind


def _encode(text: str, codec: str, kind: Kind) -> bytes:
    """JSON text can hold characters its charset lacks (from `\\u` escapes, always inside
    strings): they are written back as escapes. Other text only gained ASCII tags."""
    return text.encode(codec, _JSON_ESCAPE if kind in ("json", "jsonl") else "strict")


def _escape_for_json(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    return json.dumps(error.object[error.start : error.end])[1:-1], error.end


_JSON_ESCAPE = "sluicegate-json-escape"
codecs.register_error(_JSON_ESCAPE, _escape_for_json)
_ASCII_PROBE = string.printable


@functools.cache
def _ascii_compatible(codec: str) -> bool:
    """Whether `codec` writes ASCII text as ASCII bytes (UTF-16, UTF-7 and EBCDIC do not)."""
    return _ASCII_PROBE.encode(codec, "replace") == _ASCII_PROBE.encode("ascii")


def _decode(body: bytes, charset: str | None) -> tuple[str, str]:
    """Text and the codec to write it back with; latin-1 when the bytes do not decode."""
    codec = "utf-8"
    if charset:
        try:
            codec = codecs.lookup(charset).name
        except LookupError:
            codec = "utf-8"
    try:
        return body.decode(codec), codec
    except UnicodeDecodeError:
        return body.decode("latin-1"), "latin-1"


def _redact_json_or_text(
    text: str, redactor: TextRedactor, *, try_json: bool
) -> tuple[str, dict[str, int], bool]:
    if try_json:
        bom = "\ufeff" if text.startswith("\ufeff") else ""
        try:
            redacted = redact_json_text(text[len(bom) :], redactor)
        except JsonRedactionError as exc:
            raise BodyRefused(exc.code, str(exc)) from None
        return bom + redacted.text, redacted.counts, redacted.parsed
    result = redactor.redact_text(text)
    return result.text, result.counts, False


def _redact_lines(text: str, redactor: TextRedactor) -> tuple[str, dict[str, int]]:
    """JSON lines: each line on its own (a line that is not JSON is redacted as text)."""
    counts: dict[str, int] = {}
    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        body = line.rstrip("\r\n")
        new, line_counts, _ = _redact_json_or_text(body, redactor, try_json=True)
        if line_counts:
            lines[index] = new + line[len(body) :]
            _merge(counts, line_counts)
    return "".join(lines), counts


def _redact_form(text: str, codec: str, redactor: TextRedactor) -> tuple[str, dict[str, int]]:
    """application/x-www-form-urlencoded: decode each pair, redact, re-encode changed ones."""
    counts: dict[str, int] = {}
    pairs = text.split("&")
    for index, pair in enumerate(pairs):
        raw_name, sep, raw_value = pair.partition("=")
        name = unquote_plus(raw_name, encoding=codec, errors="surrogateescape")
        value = unquote_plus(raw_value, encoding=codec, errors="surrogateescape")
        rule = key_rule_for(redactor, name)
        if rule is not None and rule.accepts_value(value) and not TAG_PATTERN.fullmatch(value):
            name_result = redactor.redact_text(name)  # the name itself can carry a secret too
            new_name, new_value = name_result.text, redactor.tag(rule.id, value)
            _merge(counts, name_result.counts)
            _merge(counts, {rule.id: 1})
        else:
            name_result, value_result = redactor.redact_text(name), redactor.redact_text(value)
            if not (name_result.changed or value_result.changed):
                continue
            new_name, new_value = name_result.text, value_result.text
            _merge(counts, name_result.counts)
            _merge(counts, value_result.counts)
        pairs[index] = _form_quote(new_name, codec) + sep + _form_quote(new_value, codec)
    return "&".join(pairs), counts


def _form_quote(text: str, codec: str) -> str:
    return quote_plus(text, safe="", encoding=codec, errors="surrogateescape")


_PART_HEAD_END = b"\r\n\r\n"
_DISPOSITION_PARAM = re.compile(r';\s*([\w*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


def _redact_multipart(
    body: bytes, params: dict[str, str], redactor: TextRedactor, policy: BodyPolicy, depth: int
) -> BodyResult:
    """multipart/form-data: each part redacted by its own type; boundaries kept byte for byte.

    A part whose field name matches a key rule is masked whole; binary parts (file uploads)
    follow the binary policy. Everything between part bodies (preamble, part headers with their
    field names and file names, epilogue) is redacted as text, delimiters kept.
    """
    boundary = params.get("boundary")
    if not boundary:
        raise BodyRefused("multipart_no_boundary", "multipart body without a boundary")
    if depth >= _MULTIPART_DEPTH:
        raise BodyRefused("multipart_too_deep", "multipart nested too deeply")
    delimiter = b"--" + boundary.encode("latin-1")
    parts = _split_multipart(body, delimiter)
    counts: dict[str, int] = {}
    out: list[bytes] = []
    cursor = 0
    boundary_line = delimiter.decode("latin-1")

    def framing(segment: bytes) -> bytes:
        """Redact text outside the part bodies; refuse if a tag would eat a delimiter."""
        text = segment.decode("latin-1")
        result = redactor.redact_text(text)
        if not result.changed:
            return segment
        if result.text.count(boundary_line) != text.count(boundary_line):
            raise BodyRefused("multipart_malformed", "a secret overlaps a multipart boundary")
        _merge(counts, result.counts)
        return result.text.encode("latin-1")

    for head_start, body_start, body_end in parts:
        headers = _part_headers(body[head_start:body_start])
        part = body[body_start:body_end]
        disposition = headers.get("content-disposition", "")
        name = _disposition_param(disposition, "name")
        rule = key_rule_for(redactor, name) if name else None
        if rule is not None and part and rule.accepts_value(part.decode("latin-1")):
            new_part = redactor.tag(rule.id, part.decode("latin-1")).encode("ascii")
            _merge(counts, {rule.id: 1})
        else:
            part_type = headers.get("content-type")
            if part_type is None:
                # RFC 7578: text/plain for fields; a file without a type is binary.
                has_file = _disposition_param(disposition, "filename") is not None
                part_type = "application/octet-stream" if has_file else "text/plain"
            result = _redact(part, part_type, redactor, policy, depth + 1)
            new_part = result.body
            _merge(counts, result.counts)
        out += [framing(body[cursor:body_start]), new_part]
        cursor = body_end
    out.append(framing(body[cursor:]))
    if not counts:
        return BodyResult(body, False, {}, "multipart")
    return BodyResult(b"".join(out), True, counts, "multipart")


def _split_multipart(body: bytes, delimiter: bytes) -> list[tuple[int, int, int]]:
    """(headers start, body start, body end) of each part; raises on a malformed body."""
    if body.startswith(delimiter):
        position = 0
    else:
        position = body.find(b"\r\n" + delimiter)
        if position < 0:
            raise BodyRefused("multipart_malformed", "multipart boundary not found")
        position += 2
    parts: list[tuple[int, int, int]] = []
    while True:
        after = position + len(delimiter)
        if body[after : after + 2] == b"--":
            return parts  # closing delimiter; the epilogue stays as it is
        if body[after : after + 2] != b"\r\n":
            raise BodyRefused("multipart_malformed", "bad multipart delimiter line")
        head_start = after + 2
        if body.startswith(b"\r\n", head_start):
            head_end = head_start - 2  # a part without headers
        else:
            head_end = body.find(_PART_HEAD_END, head_start)
        if head_end < 0:
            raise BodyRefused("multipart_malformed", "multipart part without header end")
        body_start = head_end + len(_PART_HEAD_END)
        next_delimiter = body.find(b"\r\n" + delimiter, body_start)
        if next_delimiter < 0:
            raise BodyRefused("multipart_malformed", "multipart body not terminated")
        parts.append((head_start, body_start, next_delimiter))
        position = next_delimiter + 2


def _part_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def _disposition_param(disposition: str, name: str) -> str | None:
    for match in _DISPOSITION_PARAM.finditer(disposition):
        if match.group(1).lower() == name:
            quoted = match.group(2)
            return quoted.replace('\\"', '"') if quoted is not None else match.group(3)
    return None


def _merge(total: dict[str, int], counts: dict[str, int]) -> None:
    for rule_id, n in counts.items():
        total[rule_id] = total.get(rule_id, 0) + n
