"""Redaction of a whole HTTP body that is already content-decoded (no gzip/br/zstd here).

The body is classified by its Content-Type: JSON (also `+json` and JSON lines), text (text/*,
XML, JavaScript, YAML...), URL-encoded forms, multipart forms, binary, or unknown. Text is
decoded as a lenient reader would: a byte-order mark, or the NUL pattern of UTF-16/32 text
(RFC 4627, what `json.loads(bytes)` does), wins over the declared charset; otherwise the
declared charset (UTF-8 by default); bytes that do not decode are read as latin-1 instead,
which maps every byte to one character, so ASCII secrets are still found and every other byte
is written back unchanged. Redacted text is written back in the encoding it was read in.

The label does not limit what is looked for, since receivers do not all honour it: text that
holds JSON documents (labelled text, form, unknown, or JSON followed by trailing data) is also
redacted as JSON, escapes hiding a secret from the text rules are refused, and the other
readings of the bytes (UTF-8 when the charset is not ASCII-compatible, UTF-16/32 when there are
NULs) must not show a secret either. Binary and unknown bodies that are passed still get the
flow's literal secrets (the injected credential) scrubbed from their bytes, and JSON in them is
redacted. Bodies that cannot be redacted are passed or refused according to `BodyPolicy`; a
refusal raises `BodyRefused` with a stable code.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
import string
import time
from dataclasses import dataclass, field
from typing import Literal

from sluicegate.redaction.json_redact import JsonRedactionError, JsonStrings, redact_json_text
from sluicegate.redaction.memo import MemoRedactor, TextRedactor
from sluicegate.redaction.sse import SseError, SseRedactor
from sluicegate.shapes import decoding, form

Kind = Literal[
    "empty", "json", "jsonl", "sse", "text", "form", "multipart", "binary", "unknown"
]  # fmt: skip
EVENT_STREAM = "text/event-stream"

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
    # Buffered text/event-stream bodies: what each text channel may hold back (as in streams,
    # `redaction.max_hold_chars`), and the largest event.
    sse_max_hold: int = 4096
    sse_max_event_bytes: int = 8 << 20
    # Most seconds the SSE engine may spend on one buffered body (None: no limit); past it the
    # body is refused (`redaction_timeout`) and the work stops, instead of running on unseen.
    sse_budget_seconds: float | None = None


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


def single_content_type(values: list[str]) -> str | None:
    """The one Content-Type of a message sent with several header lines or a list in one:
    receivers take the first or the last, so different ones are refused (nothing would say
    which one the body was redacted for)."""
    types = {media_type(value)[0]: value for value in values}
    if len(types) > 1 or any("," in media for media in types):
        raise BodyRefused("conflicting_content_type", "the message has conflicting content types")
    return values[0] if values else None


def classify(content_type: str | None) -> Kind:
    media, _ = media_type(content_type)
    if not media:
        return "unknown"
    if media in _JSON_TYPES or media.endswith("+json"):
        return "json"
    if media in _JSONL_TYPES:
        return "jsonl"
    if media == EVENT_STREAM:
        return "sse"
    if media == "application/x-www-form-urlencoded":
        return "form"
    if media.startswith("multipart/"):
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
    _, params = media_type(content_type)
    if kind == "binary" or (kind == "unknown" and policy.unknown != "text"):
        if kind == "binary" and policy.binary == "block":
            raise BodyRefused("binary_body_blocked", "binary bodies cannot be redacted")
        if kind == "unknown" and policy.unknown == "block":
            raise BodyRefused("unknown_body_blocked", "body type unknown, cannot be redacted")
        return _redact_passed(body, kind, params.get("charset"), redactor)
    if kind == "multipart":
        return _redact_multipart(body, params, redactor, policy, depth)
    if kind == "sse":
        return _redact_event_stream(body, params.get("charset"), redactor, policy)
    text, codec, bom = _decode(body, params.get("charset"))
    # The JSON documents a lenient reader sees go first, read as JSON (escapes decoded, keys as
    # keys): the text or form pass then finds their tags, not the escaped spellings inside them.
    text, counts = _redact_embedded_json(text, kind, redactor)
    new_text, text_counts, kind = _redact_text(text, kind, codec, redactor)
    _merge(counts, text_counts)
    _refuse_escaped_secrets(new_text, kind, redactor)
    new_body = bom + _encode(new_text, codec, kind) if counts else body
    _check_other_readings(new_body, codec, kind, redactor)
    return BodyResult(new_body, bool(counts), counts, kind)


def _redact_event_stream(
    body: bytes, charset: str | None, redactor: TextRedactor, policy: BodyPolicy
) -> BodyResult:
    """A buffered text/event-stream body through the SSE engine (redaction/sse.py over
    shapes/events.py), as a stream of the same bytes would be: events parsed once, deltas and
    tool-call arguments through their channels, every other field through buffered JSON's
    string policy. Events the engine leaves alone stay byte-identical.

    SSE is UTF-8 (the engine reads nothing else). A declared ASCII-compatible charset (latin-1,
    windows-1252...) is honoured: the body is read in it, redacted, and written back in it, and
    the UTF-8 reading of the result (EventSource ignores the charset) must show no secret
    either. Any other reading the engine cannot honour (UTF-16/32 by label, byte-order mark or
    NUL pattern; UTF-7, EBCDIC, an unknown charset) is refused: `charset_mismatch`.
    """
    codec = _event_stream_codec(body, charset)
    data = body if codec == "utf-8" else body.decode(codec).encode("utf-8")
    out, counts = _sse_pass(data, redactor, policy)
    if codec != "utf-8":
        try:
            out = out.decode("utf-8").encode(codec, _JSON_ESCAPE)
        except UnicodeError:
            raise BodyRefused(
                "charset_mismatch", "the redacted stream cannot be written in its charset"
            ) from None
        if (
            not out.isascii()
            and _sse_pass(out.decode("utf-8", "replace").encode(), redactor, policy)[1]
        ):
            raise BodyRefused("charset_mismatch", "the UTF-8 reading of the body shows a secret")
    if out == body:
        return BodyResult(body, False, counts, "sse")
    return BodyResult(out, True, counts, "sse")


def _sse_pass(
    data: bytes, redactor: TextRedactor, policy: BodyPolicy
) -> tuple[bytes, dict[str, int]]:
    full = redactor.redactor if isinstance(redactor, MemoRedactor) else redactor
    max_hold = policy.sse_max_hold
    engine = SseRedactor(
        lambda: full.stream(max_hold),
        max_event_bytes=policy.sse_max_event_bytes,
        strings=JsonStrings(redactor),
    )
    budget = policy.sse_budget_seconds
    deadline = None if budget is None else time.monotonic() + budget
    out: list[bytes] = []
    try:
        for start in range(0, len(data), _SSE_SLICE):
            out.append(engine.feed(data[start : start + _SSE_SLICE]))
            if deadline is not None and time.monotonic() > deadline:
                raise BodyRefused("redaction_timeout", "the event stream took too long to redact")
        out.append(engine.finish())
    except SseError as exc:
        raise BodyRefused(exc.code, "the event stream cannot be redacted") from None
    return b"".join(out), engine.counts


_SSE_SLICE = 16 * 1024  # bytes fed to the engine between two looks at the clock


def event_stream_charset(charset: str | None) -> str | None:
    """The codec an event stream declared as `charset` is read in, when the SSE engine can
    honour it: UTF-8 (no charset, UTF-8, ASCII) or an ASCII-compatible one; None when it cannot
    (UTF-16/32, UTF-7, EBCDIC, an unknown name). Streams read UTF-8 only (see the README)."""
    if not charset:
        return "utf-8"
    try:
        codec = codecs.lookup(charset).name
    except LookupError:
        return None
    if codec in ("utf-8", "utf-8-sig", "ascii"):
        return "utf-8"
    if not _ascii_compatible(codec) or codec.startswith(("utf-16", "utf-32", "utf-7")):
        return None
    return codec


def _event_stream_codec(body: bytes, charset: str | None) -> str:
    """The charset the SSE engine reads `body` in: UTF-8, or a declared ASCII-compatible one
    (pure ASCII bodies read the same in both: UTF-8). Refuses what it cannot honour."""
    if _sniff(body) is not None:
        raise BodyRefused("charset_mismatch", "the event stream is UTF-16/32, not UTF-8")
    codec = event_stream_charset(charset)
    if codec is None:
        raise BodyRefused(
            "charset_mismatch", "the event stream's charset cannot be read as UTF-8 text"
        )
    if codec == "utf-8" or body.isascii():
        return "utf-8"
    try:
        body.decode(codec)
    except UnicodeDecodeError:
        raise BodyRefused("charset_mismatch", "the event stream does not decode") from None
    return codec


def _redact_passed(
    body: bytes, kind: Kind, charset: str | None, redactor: TextRedactor
) -> BodyResult:
    """A binary or unknown body the policy passes: JSON in it (whatever the label says) is
    redacted as JSON, and the flow's literal secrets are scrubbed from its bytes."""
    text, codec, bom = _try_decode(body, charset)
    counts: dict[str, int] = {}
    if text is not None and _json_documents(text)[0]:
        new_text, counts = _redact_embedded_json(text, "text", redactor)
        if counts:
            body = bom + _encode(new_text, codec, "json")
        kind = "json"
    scrubbed, literal_counts = _scrub_literal_bytes(body, redactor)
    _merge(counts, literal_counts)
    return BodyResult(scrubbed, bool(counts), counts, kind)


# -- what lenient readers see -----------------------------------------------------------------

_JSON_DECODER = json.JSONDecoder(strict=False)  # control characters in strings, as lenient
_LEADING = " \t\r\n\ufeff"


def _json_documents(text: str) -> tuple[list[tuple[int, int]], int]:
    """Spans of the JSON documents (objects, arrays, strings) `text` starts with, one after
    the other (a reader that stops after the first one, or reads a sequence), and where they
    stop."""
    spans: list[tuple[int, int]] = []
    size = len(text)
    position = size - len(text.lstrip(_LEADING))
    while position < size and text[position] in '{["':
        try:
            _, end = _JSON_DECODER.raw_decode(text, position)
        except (ValueError, RecursionError):
            break
        spans.append((position, end))
        position = end + (len(text) - end - len(text[end:].lstrip(_LEADING)))
    return spans, position


def _redact_embedded_json(
    text: str, kind: Kind, redactor: TextRedactor
) -> tuple[str, dict[str, int]]:
    """JSON documents at the start of a body that was not read as one JSON document (a
    text/plain or form label, trailing data after the document): redacted as JSON too."""
    if kind in ("json", "jsonl"):
        return text, {}
    spans, _ = _json_documents(text)
    counts: dict[str, int] = {}
    if not spans:
        return text, counts
    pieces: list[str] = []
    cursor = 0
    for start, end in spans:
        try:
            result = redact_json_text(text[start:end], redactor)
        except JsonRedactionError as exc:
            raise BodyRefused(exc.code, str(exc)) from None
        pieces += [text[cursor:start], result.text]
        _merge(counts, result.counts)
        cursor = end
    pieces.append(text[cursor:])
    return ("".join(pieces), counts) if counts else (text, counts)


_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|[/\\\-_'\"])")


def _unescape(match: re.Match[str]) -> str:
    escape = match.group()
    if escape[1] in "ux":
        return chr(int(escape[2:], 16))
    return escape[1]


def _refuse_escaped_secrets(text: str, kind: Kind, redactor: TextRedactor) -> None:
    """Text (not parsed as JSON) whose `\\u`/`\\x`/`\\/` escapes, once decoded as a JSON or
    JavaScript reader decodes them, show a secret the rules did not see: refused."""
    if kind in ("json", "jsonl") or "\\" not in text:
        return
    spans, _ = _json_documents(text)
    cursor = 0
    for start, end in [*spans, (len(text), len(text))]:
        region = text[cursor:start]
        cursor = end
        if not _ESCAPE.search(region):
            continue
        view = _ESCAPE.sub(_unescape, region)
        view = view.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        if redactor.redact_text(view).changed:
            raise BodyRefused("escaped_secret", "escapes in the text hide a secret")


def _literals(redactor: TextRedactor) -> dict[str, str]:
    full = redactor.redactor if isinstance(redactor, MemoRedactor) else redactor
    return full.literals


_COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"))
_MAX_INNER = 64 * 1024 * 1024


def _scrub_literal_bytes(body: bytes, redactor: TextRedactor) -> tuple[bytes, dict[str, int]]:
    """The flow's literal secrets (the injected credential in its encodings) replaced by their
    tags in the bytes of a body nothing else redacts, in UTF-8 and UTF-16/32; a compressed body
    (gzip, zstd, zlib) holding one is refused."""
    literals = _literals(redactor)
    counts: dict[str, int] = {}
    if not literals:
        return body, counts
    for value in sorted(literals, key=len, reverse=True):
        rule_id = literals[value]
        tag = redactor.tag(rule_id, value)
        for codec in ("utf-8", *_WIDE):
            needle = value.encode(codec, "surrogatepass")
            found = body.count(needle)
            if found:
                body = body.replace(needle, tag.encode(codec))
                counts[rule_id] = counts.get(rule_id, 0) + found
    inner = _inner_decoded(body)
    if inner is not None and any(
        value.encode(codec, "surrogatepass") in inner
        for value in literals
        for codec in ("utf-8", *_WIDE)
    ):
        raise BodyRefused("credential_in_compressed_body", "compressed data holds a credential")
    return body, counts


def _inner_decoded(body: bytes) -> bytes | None:
    """A passed body that is itself compressed data, decoded (None: it is not)."""
    coding = next((c for magic, c in _COMPRESSED_MAGIC if body.startswith(magic)), None)
    if (
        coding is None
        and len(body) > 2
        and body[0] & 0x0F == 8
        and (body[0] << 8 | body[1]) % 31 == 0
    ):
        coding = "deflate"
    if coding is None:
        return None
    try:
        return decoding.decode_body(body, coding, _MAX_INNER)
    except decoding.BodyTooLarge:
        raise BodyRefused("body_too_large", "compressed data too large to inspect") from None
    except decoding.DecodingError:
        return None


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


# Byte-order marks, longest first (the UTF-32-LE mark starts like the UTF-16-LE one).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_WIDE = ("utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")


def _sniff(body: bytes) -> tuple[str, bytes] | None:
    """(codec, byte-order mark) of UTF-16/32 text, by its mark or by where the NULs of its
    first characters are (RFC 4627 section 3, as `json.loads(bytes)` reads it)."""
    for bom, codec in _BOMS:
        if body.startswith(bom):
            return codec, bom
    head = body[:4]
    if len(head) < 4 or b"\0" not in head:
        return None
    if head[:3] == b"\0\0\0":
        return "utf-32-be", b""
    if head[1:] == b"\0\0\0":
        return "utf-32-le", b""
    if head[0] == 0 and head[2] == 0:
        return "utf-16-be", b""
    if head[1] == 0 and head[3] == 0:
        return "utf-16-le", b""
    return None


def _decode(body: bytes, charset: str | None) -> tuple[str, str, bytes]:
    """(text, codec to write it back with, byte-order mark to put before it).

    A byte-order mark or the NUL pattern of UTF-16/32 wins over the declared charset when the
    bytes decode that way (lenient readers go by the bytes); else the declared charset, else
    UTF-8; latin-1 when the bytes do not decode."""
    text, codec, bom = _try_decode(body, charset)
    if text is None:
        return body.decode("latin-1"), "latin-1", b""
    return text, codec, bom


def _try_decode(body: bytes, charset: str | None) -> tuple[str | None, str, bytes]:
    """As `_decode`, with None for bytes that do not decode."""
    sniffed = _sniff(body)
    if sniffed is not None:
        codec, bom = sniffed
        try:
            return body[len(bom) :].decode(codec), codec, bom
        except UnicodeDecodeError:
            pass
    codec = "utf-8"
    if charset:
        try:
            codec = codecs.lookup(charset).name
        except LookupError:
            codec = "utf-8"
    try:
        return body.decode(codec), codec, b""
    except UnicodeDecodeError:
        return None, codec, b""


def _check_other_readings(body: bytes, codec: str, kind: Kind, redactor: TextRedactor) -> None:
    """Refuse when the bytes read another way (UTF-8 although the charset is not ASCII-
    compatible, or UTF-16/32 when there are NULs) still show a secret."""
    readings: list[tuple[str, str]] = []
    if not _ascii_compatible(codec):
        text, view_codec, _ = _decode(body, None)
        readings.append((text, view_codec))
    if b"\0" in body:
        for wide in _WIDE:
            if wide == codec or len(body) % (2 if "16" in wide else 4):
                continue
            try:
                readings.append((body.decode(wide).lstrip("\ufeff"), wide))
            except UnicodeDecodeError:
                continue
    for text, view_codec in readings:
        if _redact_text(text, kind, view_codec, redactor)[1]:
            raise BodyRefused(
                "charset_mismatch", "another reading of the body's bytes shows a secret"
            )


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
    """application/x-www-form-urlencoded (and query strings): each field read through the form
    model (shapes/form.py) with buffered JSON's string policy, so a field name is a JSON key."""
    new_text, counts = form.redact_urlencoded(text, codec, JsonStrings(redactor))
    return new_text, dict(counts)


def _redact_multipart(
    body: bytes, params: dict[str, str], redactor: TextRedactor, policy: BodyPolicy, depth: int
) -> BodyResult:
    """multipart/form-data: each part redacted by its own type; boundaries kept byte for byte.

    A part whose field name a key rule names is masked whole, as the same key in JSON would be
    (shapes/form.py); other parts are redacted by their own type and charset (binary ones, file
    uploads, follow the binary policy and are passed byte-identical). Everything between part
    bodies (preamble, part headers with their field names and file names, epilogue) is redacted
    as text, delimiters kept.
    """
    try:
        if params.get("boundary") and depth >= form.MAX_DEPTH:
            raise form.FormError("multipart_too_deep", "multipart nested too deeply")
        multipart = form.MultipartForm.parse(body, params.get("boundary"))
        strings = JsonStrings(redactor)
        counts: dict[str, int] = {}
        new_bodies: dict[int, bytes] = {}
        for index, part in enumerate(multipart.parts):
            decoded = multipart.part_body(part)
            new_decoded, part_counts = _redact_part(decoded, part, strings, policy, depth)
            if part_counts:
                new_bodies[index] = multipart.encoded(part, new_decoded)
                _merge(counts, part_counts)
    except form.FormError as exc:
        raise BodyRefused(exc.code, exc.message) from None
    boundary_line = "--" + multipart.boundary

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

    new_body = multipart.rebuild(new_bodies, framing)
    if not counts:
        return BodyResult(body, False, {}, "multipart")
    return BodyResult(new_body, True, counts, "multipart")


def _redact_part(
    part_body: bytes, part: form.Part, strings: JsonStrings, policy: BodyPolicy, depth: int
) -> tuple[bytes, dict[str, int]]:
    """One part's (transfer-decoded) body: a credential field masked whole by its key rule (the
    same `StringPolicy` answer a JSON key gets), anything else redacted by the part's type.

    The key rule reads text: a part typed as text, or whose bytes decode as text (a key file
    labelled application/octet-stream). Binary content (an image under a field named `api_key`)
    is never replaced by a tag: it follows the binary policy and passes byte-identical."""
    name = part.name
    rule = form.key_rule(strings, name) if name else None
    if rule is not None and part_body:
        _, part_params = media_type(part.content_type)
        text, _, _ = _try_decode(part_body, part_params.get("charset"))
        if text is None and classify(part.content_type) not in ("binary", "unknown"):
            text = part_body.decode("latin-1")  # text by its type: read it the lenient way
        masked = strings.masked(rule, text) if text is not None else None
        if masked is not None:
            return masked[0].encode("ascii"), dict(masked[1])
    result = _redact(part_body, part.content_type, strings.redactor, policy, depth + 1)
    return result.body, result.counts


def _merge(total: dict[str, int], counts: dict[str, int]) -> None:
    for rule_id, n in counts.items():
        total[rule_id] = total.get(rule_id, 0) + n
