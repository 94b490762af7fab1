"""Secrets hidden in an encoding: base64 (standard or URL-safe), hex (plain or delimited),
percent-encoding (once or several times), HTML entities, JSON / C / Unicode escapes, and any
of these inside another.

The rules match plain text. Whole-text redaction (`Redactor.redact_text`) also asks this
module for the spans of the text that are encoded, decodes each one, runs the rules on what it
decodes to (and looks for encodings in there again, to `MAX_DEPTH`), and masks the encoded
span when the decoded text holds a secret:

- *escapes* (`%XX`, `&#NN;` / `&#xNN;` / `&name;`, `\\uXXXX`, `\\xNN`, `\\n`...) are decoded
  character by character in a region around each escape that hides a character (a `%20` or
  `&amp;` does, a lone `\\n` does not), and every decoded character remembers where it came
  from: a finding is mapped back to exactly the escaped characters that spell it, so
  `password%3Dhunter%32` loses `hunter%32` only;
- *blocks* (base64, hex) are decoded whole when they decode to text (UTF-8, printable); a
  finding inside masks the whole block.

Everything is bounded so that a crafted body cannot turn this into a denial of service: spans
longer than `MAX_SPAN` are not decoded, at most `MAX_CANDIDATES` spans per text and level and
`MAX_DECODED` decoded characters per call are tried, and the recursion stops at `MAX_DEPTH`.
Past a bound the rest is simply not decoded (the plain-text rules still ran on all of it).

Streams (`StreamRedactor`) do not decode: an encoded secret can start at any letter, and
holding back every letter until the end of its run would hold back most of a stream. A
streamed answer is redacted by the plain rules only (see README, Redaction).
"""

from __future__ import annotations

import base64
import binascii
import html.entities
import re
from collections.abc import Iterator
from dataclasses import dataclass

MAX_DEPTH = 3
MAX_SPAN = 64 * 1024
MAX_CANDIDATES = 256
MAX_DECODED = 1024 * 1024
# Characters of context kept around an escape, so that a key before an escaped value
# (`password=%68%75...`) is decoded with it.
_ESCAPE_CONTEXT = 200

# An escape that hides a character a rule could need. `\n`, `\t`, `\"` and `\\` alone are
# ordinary in code and JSON text: they are decoded inside a region, never start one.
_HIDING_ESCAPE = re.compile(
    r"%[0-9A-Fa-f]{2}|&#[0-9]{1,7};|&#[xX][0-9A-Fa-f]{1,6};|&[A-Za-z][A-Za-z0-9]{1,31};"
    r"|\\u[0-9A-Fa-f]{4}|\\x[0-9A-Fa-f]{2}|\\U[0-9A-Fa-f]{8}"
)
_ESCAPE = re.compile(
    r"%([0-9A-Fa-f]{2})|&#([0-9]{1,7});|&#[xX]([0-9A-Fa-f]{1,6});|&([A-Za-z][A-Za-z0-9]{1,31});"
    r"|\\u([0-9A-Fa-f]{4})|\\x([0-9A-Fa-f]{2})|\\U([0-9A-Fa-f]{8})|\\([nrtbf\"'\\/])"
)
_SIMPLE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f"}
# Candidate runs are found on a one-byte-per-character copy of the text mapped through a
# table (C speed, ~10x faster than a regex character-class scan): base64 alphabet -> "a",
# hex digits and byte delimiters -> "h" / "d" for delimited hex, anything else -> " ".
_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-="
_RUN_TABLE = bytes(ord("a") if i < 128 and bytes([i]) in _B64_CHARS else 32 for i in range(256))
_HEX_TABLE = bytes(
    ord("h") if bytes([i]) in b"0123456789abcdefABCDEF" else ord("d") if i in b": -" else 32
    for i in range(256)
)
_MIN_RUN = 20
_DELIMITED_HEX = re.compile(r"[0-9A-Fa-f]{2}(?:([:\- ])[0-9A-Fa-f]{2})(?:\1[0-9A-Fa-f]{2}){8,}")
_LOWER_RUN = re.compile(r"[a-z]{5,}")


@dataclass(frozen=True)
class Decoded:
    """A span of the text, what it decodes to, and how decoded offsets map back.

    `starts[i]` / `ends[i]` are the span-relative offsets of the encoded characters that
    decoded character i came from; None for a block encoding, where any finding masks the
    whole span."""

    start: int
    end: int
    text: str
    starts: list[int] | None = None
    ends: list[int] | None = None
    # The region was cut inside a word at its start / end (no space near enough): a finding
    # touching that edge may be an artefact of the cut (a token's tail read as a token).
    cut_start: bool = False
    cut_end: bool = False

    def keeps(self, start: int, end: int) -> bool:
        """Whether a finding at decoded [start, end) counts (not an artefact of a cut)."""
        return not ((self.cut_start and start == 0) or (self.cut_end and end == len(self.text)))

    def source(self, start: int, end: int) -> tuple[int, int]:
        """The encoded span (text offsets) holding decoded characters [start, end)."""
        if self.starts is None or self.ends is None:
            return self.start, self.end
        return self.start + self.starts[start], self.start + self.ends[end - 1]


def _unescape(text: str) -> tuple[str, list[int], list[int]] | None:
    """`text` with every escape decoded, and per decoded character its source span. Percent
    escapes spelling a UTF-8 sequence become that character. None if nothing changed."""
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    cursor = 0
    pending: list[tuple[int, int, int]] = []  # percent-escaped bytes: (byte, start, end)

    def flush_bytes() -> None:
        data = bytes(b for b, _, _ in pending)
        decoded = data.decode("utf-8", "replace")
        if len(decoded) == len(data):  # ASCII (or replaced bytes): one char per byte
            for char, (_, s, e) in zip(decoded, pending, strict=True):
                out.append(char)
                starts.append(s)
                ends.append(e)
        else:  # multi-byte characters: each spans the escapes of the whole run
            for char in decoded:
                out.append(char)
                starts.append(pending[0][1])
                ends.append(pending[-1][2])
        pending.clear()

    for match in _ESCAPE.finditer(text):
        start, end = match.span()
        if pending and (start != pending[-1][2] or match.group(1) is None):
            flush_bytes()
        for index in range(cursor, start):
            out.append(text[index])
            starts.append(index)
            ends.append(index + 1)
        cursor = end
        percent, dec, hexa, name, u4, x2, u8, simple = match.groups()
        if percent is not None:
            pending.append((int(percent, 16), start, end))
            continue
        if dec is not None or hexa is not None or u4 is not None or x2 is not None or u8:
            code = int(dec) if dec is not None else int(hexa or u4 or x2 or u8, 16)
            char = chr(code) if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else "\ufffd"
        elif name is not None:
            char = html.entities.html5.get(name + ";", "")
            if len(char) != 1:  # unknown or multi-character entity: keep it as written
                char = match.group()
                for offset, piece in enumerate(char):
                    out.append(piece)
                    starts.append(start + offset)
                    ends.append(start + offset + 1)
                continue
        else:
            char = _SIMPLE_ESCAPES.get(simple, simple)
        out.append(char)
        starts.append(start)
        ends.append(end)
    if pending:
        flush_bytes()
    if cursor == 0 and not out:
        return None
    for index in range(cursor, len(text)):
        out.append(text[index])
        starts.append(index)
        ends.append(index + 1)
    decoded = "".join(out)
    return (decoded, starts, ends) if decoded != text else None


def _text_of(data: bytes) -> str | None:
    """`data` as text if it is UTF-8 and mostly printable (random keys, hashes and images
    decode to binary)."""
    if len(data) < 8:
        return None
    text = data.decode("utf-8", "replace")
    printable = sum((c.isprintable() and c != "\ufffd") or c in "\n\r\t" for c in text)
    return text if printable * 10 >= len(text) * 9 else None


def _decode_base64(span: str) -> str | None:
    # Identifiers (`UpdateCloudFrontOriginAccessIdentity`) are valid base64 letters; base64
    # of text has no long runs of lowercase letters.
    if sum(len(run) for run in _LOWER_RUN.findall(span)) * 3 > len(span):
        return None
    body = span.rstrip("=")
    # A run glued to other letters (`<base64>data`) is read up to its last whole quantum:
    # the text it spells comes out, followed by a few bytes of garbage `_text_of` allows.
    body = body[: len(body) - len(body) % 4] if len(body) % 4 == 1 else body
    body += "=" * (-len(body) % 4)
    altchars = b"-_" if ("-" in body or "_" in body) else None
    try:
        data = base64.b64decode(body, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        return None
    return _text_of(data)


def _text_nibbles(digits: bytes) -> bool:
    """Hex of ASCII text: the high digit of (nearly) every byte is 2-7; random hex (hashes,
    ids) has them 3 times in 8."""
    high = digits[0::2]
    return len(high.translate(None, b"234567")) * 10 <= len(high)


def _decode_hex(span: str) -> str | None:
    digits = span.replace(":", "").replace("-", "").replace(" ", "")
    if not _text_nibbles(digits.encode("ascii")):
        return None
    try:
        return _text_of(bytes.fromhex(digits))
    except ValueError:
        return None


_SPACE = " \t\r\n"


def _boundary_before(text: str, position: int) -> int:
    """A region start at or before `position`: just after a space within `_ESCAPE_CONTEXT`
    characters, else the start of the text if that is as near, else `position`."""
    low = max(0, position - _ESCAPE_CONTEXT)
    best = max(text.rfind(char, low, position) for char in _SPACE)
    if best >= 0:
        return best + 1
    return 0 if low == 0 else position


def _boundary_after(text: str, position: int) -> int:
    """A region end at or after `position`: a space within `_ESCAPE_CONTEXT` characters, else
    the end of the text if that is as near, else `position`."""
    high = min(len(text), position + _ESCAPE_CONTEXT)
    found = [i for i in (text.find(char, position, high) for char in _SPACE) if i >= 0]
    if found:
        return min(found)
    return len(text) if high == len(text) else position


def _escape_regions(text: str) -> Iterator[tuple[int, int]]:
    """Regions of `text` around escapes that hide a character (with `_ESCAPE_CONTEXT`
    characters of context each side, widened to the nearest spaces), merged."""
    region: tuple[int, int] | None = None
    for match in sorted(_hiding_escapes(text), key=lambda m: m.start()):
        end = _boundary_after(text, min(len(text), match.end() + _ESCAPE_CONTEXT))
        if region is not None and match.start() - _ESCAPE_CONTEXT <= region[1]:
            region = (region[0], max(region[1], end))
            continue
        start = _boundary_before(text, max(0, match.start() - _ESCAPE_CONTEXT))
        if region is not None and start <= region[1]:
            region = (region[0], max(region[1], end))
            continue
        if region is not None:
            yield region
        region = (start, end)
    if region is not None:
        yield region


# What every escape that hides a character starts with (`\n` alone hides nothing).
_ESCAPE_NEEDLES = ("%", "&", "\\u", "\\x", "\\U")
_BACKSLASH_ESCAPE = re.compile(r"\\[uxU]")


def _escape_starts(text: str) -> bool:
    """Whether `text` holds one of `_ESCAPE_NEEDLES`. Most texts hold none: one-character
    needles are found by memchr, and the backslash ones only looked for where there is a
    backslash, in one pass (three two-character searches cost ten times as much)."""
    if "%" in text or "&" in text:
        return True
    return "\\" in text and _BACKSLASH_ESCAPE.search(text) is not None


def _hiding_escapes(text: str) -> Iterator[re.Match[str]]:
    """`_HIDING_ESCAPE` matches, looked for only where `%`, `&` or a backslash is."""
    for needle in _ESCAPE_NEEDLES:
        position = text.find(needle)
        while position >= 0:
            match = _HIDING_ESCAPE.match(text, position)
            if match is not None:
                yield match
            position = text.find(needle, position + 1)


def _block_runs(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, kind) of base64/hex runs of `_MIN_RUN`+ characters and of delimited hex
    (`de:ad:be:ef...`), in text order per kind."""
    data = text.encode("latin-1", "replace")  # one byte per character: offsets are kept
    mapped = data.translate(_RUN_TABLE)
    needle = b"a" * _MIN_RUN
    position = mapped.find(needle)
    while position >= 0:
        end = mapped.find(b" ", position)
        end = len(mapped) if end < 0 else end
        run = data[position:end]
        # Cheap refusals first (bytes operations, no Python loop): random hex (ids, hashes:
        # the high digit of every byte of hex-encoded text is 2-7) and names with few
        # capitals (base64 of text is ~35-50 % capitals). See `_decode_block`.
        hex_head = len(run) - len(run.lstrip(_HEX_BYTES))
        if hex_head == len(run):
            if _text_nibbles(run):
                yield position, end, "run"
        elif hex_head >= _MIN_RUN and _text_nibbles(run[:hex_head]):
            yield position, position + hex_head - hex_head % 2, "hex"  # hex glued to letters
        elif (len(run) - len(run.translate(None, _UPPER))) * 5 >= len(run) or b"=" in run:
            yield position, end, "run"
        position = mapped.find(needle, end)
    if b":" in data or b" " in data:
        mapped = data.translate(_HEX_TABLE)
        position = mapped.find(b"hhdhhdhhdhh")
        while position >= 0:
            match = _DELIMITED_HEX.match(text, position)
            if match is None:
                position = mapped.find(b"hhdhhdhhdhh", position + 1)
                continue
            yield match.start(), match.end(), "hex"
            position = mapped.find(b"hhdhhdhhdhh", match.end())


_PIECE = re.compile(r"[^=]+=*")


def _decode_run(run: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, text) of the parts of a base64/hex run that decode to text: the whole
    run, else its pieces between `=` (`data=<base64>` is one run) and, for a run with `/`
    (a URL path), its pieces between slashes. One base64 alphabet at a time; a run of hex
    digits of even length is read as hex first."""
    decoded = _decode_block(run)
    if decoded is not None:
        yield 0, len(run), decoded
        return
    pieces = [m.span() for m in _PIECE.finditer(run)] if "=" in run.rstrip("=") else []
    if "/" in run:
        position = 0
        for piece in run.split("/"):
            pieces.append((position, position + len(piece)))
            position += len(piece) + 1
    for start, end in pieces:
        if end - start >= _MIN_RUN and (start, end) != (0, len(run)):
            decoded = _decode_block(run[start:end])
            if decoded is not None:
                yield start, end, decoded


def _decode_block(run: str) -> str | None:
    body = run.rstrip("=")
    if "=" in body:
        return None
    raw = body.encode("ascii")
    hex_head = len(raw) - len(raw.lstrip(_HEX_BYTES))
    if hex_head == len(raw) and len(raw) % 2 == 0:
        return _decode_hex(body)
    if hex_head >= _MIN_RUN and _text_nibbles(raw[:hex_head]):
        return _decode_hex(body[: hex_head - hex_head % 2])  # hex glued to letters
    if ("+" in body or "/" in body) and ("-" in body or "_" in body):
        return None
    # Base64 of text is ~35-50 % capitals (the first character of every 4 encodes a byte's
    # top bits); names (`request_body_config`, `CamelCaseName`) have few.
    if (len(raw) - len(raw.translate(None, _UPPER))) * 5 < len(raw):
        return None
    return _decode_base64(run)


_UPPER = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"


_HEX_BYTES = b"0123456789abcdefABCDEF"


def decoded_spans(text: str, budget: list[int]) -> Iterator[Decoded]:
    """The encoded spans of `text` and what they decode to (see the module docstring).

    `budget` is `[decoded characters left]`, shared by the whole call tree."""
    candidates = 0
    if _escape_starts(text):
        for start, end in _escape_regions(text):
            if candidates >= MAX_CANDIDATES or budget[0] <= 0:
                return
            if end - start > MAX_SPAN:
                end = start + MAX_SPAN
            candidates += 1
            result = _unescape(text[start:end])
            if result is not None:
                decoded, starts, ends = result
                budget[0] -= len(decoded)
                cut_start = start > 0 and text[start - 1] not in _SPACE
                cut_end = end < len(text) and text[end] not in _SPACE
                yield Decoded(start, end, decoded, starts, ends, cut_start, cut_end)
    if len(text) < _MIN_RUN:
        return
    for start, end, kind in _block_runs(text):
        if candidates >= MAX_CANDIDATES or budget[0] <= 0:
            return
        if end - start > MAX_SPAN:
            continue
        candidates += 1
        run = text[start:end]
        if kind == "hex":
            as_hex = _decode_hex(run)
            found = [] if as_hex is None else [(0, len(run), as_hex)]
        else:
            found = list(_decode_run(run))
        for piece_start, piece_end, decoded in found:
            budget[0] -= len(decoded)
            yield Decoded(start + piece_start, start + piece_end, decoded)
