"""The parts of a message around its body: header fields, trailers, the reason phrase, the path.

Bodies are not the only place a secret travels: an upstream echoes the injected key in an error
header, a gRPC `grpc-message` trailer, a reason phrase (`401 Invalid key sk-...`) or even a header
*name*; an agent carries a token in a `Cookie`, a `Referer`, an `X-*` header or a path segment.
Each part is read with the same rule pack as bodies (and, for responses, the flow's scrub
literals), and where a secret is found:

- a header or trailer **value** is redacted in place (`[REDACTED:<rule>]` is a valid field
  value). Cookies are read pair by pair and URL-valued fields (`Referer`, `Location`, ...) have
  their query read like a form, so key rules (`session=`, `access_token=`) apply to their names;
  a field whose name a key rule matches (`X-Auth-Token`) has its whole value masked.
- a header **name** cannot hold a tag (brackets are no token characters): the field is
  reported in `FieldsResult.names` and the caller drops it (responses) or refuses the message
  (requests).
- a **reason phrase** is replaced by the standard phrase of its status.
- a **path** cannot be redacted without sending the request somewhere else: `path_findings`
  says which rules matched and the request is refused.

No mitmproxy here: fields are `(name, value)` byte pairs as they travel.
"""

from __future__ import annotations

import dataclasses
import http
from collections.abc import Iterable
from typing import Final
from urllib.parse import quote

from sluicegate.redaction.bodies import BodyPolicy, redact_body
from sluicegate.redaction.memo import TextRedactor, key_rule_for
from sluicegate.redaction.redactor import TAG_PATTERN

Field = tuple[bytes, bytes]

# Fields that carry framing or routing, never a credential: left alone (the gateway checks
# them elsewhere, and rewriting them would break the message).
STRUCTURAL: Final = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "host",
        "te",
        "upgrade",
        "content-encoding",
        "accept-encoding",
        "date",
    }
)
# Fields whose value is a URL (or a list of them): the query is read as a form.
URL_FIELDS: Final = frozenset({"referer", "location", "content-location", "origin", "link"})
_FORM: Final = "application/x-www-form-urlencoded"
_FORM_POLICY: Final = BodyPolicy()


@dataclasses.dataclass
class FieldsResult:
    fields: list[Field]
    counts: dict[str, int]
    names: dict[str, int]  # rules found in header *names* (those fields are dropped)
    changed: bool


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _merge(total: dict[str, int], counts: dict[str, int]) -> None:
    for rule, n in counts.items():
        total[rule] = total.get(rule, 0) + n


def redact_fields(
    fields: Iterable[Field], redactor: TextRedactor, *, skip: frozenset[str] = STRUCTURAL
) -> FieldsResult:
    """Redact every field's value; fields whose name holds a secret are left out of `fields`."""
    out: list[Field] = []
    counts: dict[str, int] = {}
    names: dict[str, int] = {}
    changed = False
    for raw_name, raw_value in fields:
        name = _text(raw_name)
        lower = name.lower()
        if lower in skip or lower.startswith(":"):
            out.append((raw_name, raw_value))
            continue
        name_result = redactor.redact_text(name)
        if name_result.changed:
            _merge(names, name_result.counts)
            changed = True
            continue
        value, found = redact_value(lower, _text(raw_value), redactor)
        if found:
            _merge(counts, found)
            out.append((raw_name, _bytes(value)))
            changed = True
        else:
            out.append((raw_name, raw_value))
    return FieldsResult(out, counts, names, changed)


def redact_value(name: str, value: str, redactor: TextRedactor) -> tuple[str, dict[str, int]]:
    """One field's value, read by what the field is (`name` lower-case); the redacted value
    and the counts (empty: unchanged)."""
    if name == "cookie":
        return _redact_pairs(value, redactor, attributes=False)
    if name == "set-cookie":
        return _redact_pairs(value, redactor, attributes=True)
    if name in URL_FIELDS:
        return _redact_url(value, redactor)
    rule = key_rule_for(redactor, name)
    if rule is not None and value and rule.accepts_value(value) and not TAG_PATTERN.search(value):
        return redactor.tag(rule.id, value), {rule.id: 1}
    result = redactor.redact_text(value)
    return result.text, dict(result.counts)


def _redact_pairs(
    value: str, redactor: TextRedactor, *, attributes: bool
) -> tuple[str, dict[str, int]]:
    """`a=1; b=2` (Cookie) or `a=1; Path=/; HttpOnly` (Set-Cookie: the first pair is the
    cookie, the rest its attributes, read as text)."""
    counts: dict[str, int] = {}
    parts = value.split(";")
    for index, part in enumerate(parts):
        if attributes and index > 0:
            result = redactor.redact_text(part)
            if result.changed:
                parts[index] = result.text
                _merge(counts, result.counts)
            continue
        name, sep, cookie = part.partition("=")
        key = name.strip()
        rule = key_rule_for(redactor, key) if sep else None
        if (
            rule is not None
            and cookie.strip()
            and rule.accepts_value(cookie.strip())
            and not TAG_PATTERN.search(cookie)
        ):
            parts[index] = f"{name}{sep}{redactor.tag(rule.id, cookie.strip())}"
            _merge(counts, {rule.id: 1})
            continue
        name_result = redactor.redact_text(name)
        value_result = redactor.redact_text(cookie)
        if name_result.changed or value_result.changed:
            parts[index] = name_result.text + sep + value_result.text
            _merge(counts, name_result.counts)
            _merge(counts, value_result.counts)
    return ";".join(parts), counts


def _redact_url(value: str, redactor: TextRedactor) -> tuple[str, dict[str, int]]:
    """A URL: its query as a form (key rules see the names), the rest as text."""
    counts: dict[str, int] = {}
    head, sep, rest = value.partition("?")
    head_result = redactor.redact_text(head)
    _merge(counts, head_result.counts)
    if sep:
        query, hash_sep, fragment = rest.partition("#")
        query_result = redact_body(_bytes(query), _FORM, redactor, _FORM_POLICY)
        fragment_result = redactor.redact_text(fragment)
        _merge(counts, query_result.counts)
        _merge(counts, fragment_result.counts)
        rest = _text(query_result.body) + hash_sep + fragment_result.text
    return head_result.text + sep + rest, counts


def redact_reason(status: int, reason: str, redactor: TextRedactor) -> tuple[str, dict[str, int]]:
    """A reason phrase holding a secret becomes the standard phrase of `status` (any other
    text could still carry part of it); a clean one is kept as it is."""
    if not reason:
        return reason, {}
    result = redactor.redact_text(reason)
    if not result.changed:
        return reason, {}
    try:
        standard = http.HTTPStatus(status).phrase
    except ValueError:
        standard = ""
    return standard, dict(result.counts)


def path_findings(decoded_path: str, redactor: TextRedactor) -> dict[str, int]:
    """The rules matching a (percent-decoded) path, with their counts (empty: clean)."""
    return dict(redactor.redact_text(decoded_path).counts)


def redacted_target(decoded_path: str, query: str, redactor: TextRedactor) -> str:
    """A request target with its secrets replaced by (percent-encoded) tags: what a refused
    request is recorded with (it never leaves, so it need not be the path it asked for)."""
    path = quote(redactor.redact_text(decoded_path).text, safe="/")
    if not query:
        return path
    rest, _ = _redact_url("?" + query, redactor)
    return path + rest
