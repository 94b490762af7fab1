"""JSON-aware redaction.

Rules see *decoded* string values, so JSON escapes (`\\u002d`, `\\/`) cannot hide a secret
from them. Every key/value pair is kept, duplicates included: a downstream parser may take
the first or the last occurrence, so each one is scanned. String values of credential-named
keys (key rules) are masked when the rule accepts them as credentials (`KeyRule.accepts_value`);
other values keep their type and are walked like any other. Below an `example(s)` key (API
documentation) key rules do not apply; text rules do. JSON nested inside string values (tool-call
`arguments`, embedded payloads) is parsed and redacted the same way, to a bounded depth.
The document is serialized again only if something changed; numbers keep their original
text and key order is preserved. Text that is not JSON is redacted as plain text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sluicegate.redaction.memo import TextRedactor, key_rule_for
from sluicegate.redaction.redactor import TAG_PATTERN
from sluicegate.redaction.rules import KeyRule
from sluicegate.shapes.channels import KeyRuleLike

MAX_DEPTH = 200  # nesting of arrays/objects, counted across nested documents
MAX_NESTED_DOCUMENTS = 4  # JSON inside a string inside JSON...
# Code points json.loads leaves for lone `\udXXX` escapes (pairs become one character).
_SURROGATE = re.compile("[\ud800-\udfff]")


class JsonRedactionError(Exception):
    """A JSON document that cannot be redacted safely; `code` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Pairs(list[tuple[str, object]]):
    """A JSON object as its (key, value) pairs, in order, duplicates kept."""


@dataclass(frozen=True)
class _Number:
    """A JSON number kept as written (no float rounding, no 1e400 -> Infinity)."""

    text: str


@dataclass(frozen=True)
class JsonRedactionResult:
    text: str
    counts: dict[str, int] = field(default_factory=dict)
    parsed: bool = True  # False: not JSON, redacted as plain text

    @property
    def changed(self) -> bool:
        return bool(self.counts)


def redact_json_text(text: str, redactor: TextRedactor) -> JsonRedactionResult:
    """Redact a JSON document (or plain text, if `text` is not JSON)."""
    document = _parse(text)
    if document is _NOT_JSON:
        result = redactor.redact_text(text)
        return JsonRedactionResult(result.text, result.counts, parsed=False)
    walker = _Walker(redactor)
    value, changed = walker.value(document, depth=0, nesting=0)
    if not changed:
        return JsonRedactionResult(text, {})
    return JsonRedactionResult(serialize(value), walker.counts)


_NOT_JSON = object()


def _parse(text: str) -> object:
    """The parsed document, or `_NOT_JSON`."""
    stripped = text.strip()
    if not stripped or stripped[0] not in '{["-0123456789tfn':
        return _NOT_JSON
    try:
        return json.loads(text, object_pairs_hook=_Pairs, parse_float=_Number, parse_int=_Number)
    except RecursionError:
        raise JsonRedactionError("json_too_deep", "JSON nesting too deep to redact") from None
    except ValueError:
        return _NOT_JSON


# Keys whose value documents example data (OpenAPI `example`/`examples`, botocore example
# files): field names there describe the example, so key rules do not apply below them (every
# text rule still does).
_EXAMPLE_KEYS = frozenset({"example", "examples", "x-example", "x-examples"})


def _never(container: object, key: Hashable) -> bool:
    return False


class _Walker:
    def __init__(
        self, redactor: TextRedactor, skip: Callable[[Any, Hashable], bool] = _never
    ) -> None:
        self.redactor = redactor
        self.skip = skip  # (container, key) pairs another reader owns (stream channels)
        self.counts: dict[str, int] = {}
        self.in_example = 0  # > 0: inside the value of an example key

    def count(self, counts: dict[str, int]) -> None:
        for rule_id, n in counts.items():
            self.counts[rule_id] = self.counts.get(rule_id, 0) + n

    def value(self, value: object, depth: int, nesting: int) -> tuple[object, bool]:
        if depth > MAX_DEPTH:
            raise JsonRedactionError("json_too_deep", "JSON nesting too deep to redact")
        if isinstance(value, _Pairs):
            return self.pairs(value, depth, nesting)
        if isinstance(value, dict):
            return self.dict_object(value, depth, nesting)
        if isinstance(value, list):
            items, changed = [], False
            for item in value:
                new, item_changed = self.value(item, depth + 1, nesting)
                items.append(new)
                changed |= item_changed
            return (items if changed else value), changed
        if isinstance(value, str):
            return self.string(value, depth, nesting)
        return value, False

    def dict_object(self, obj: dict[str, Any], depth: int, nesting: int) -> tuple[object, bool]:
        """A parsed object as a dict (an SSE event): rewritten in place, key order kept."""
        pairs, changed = self.pairs(_Pairs(obj.items()), depth, nesting, obj)
        if changed:
            assert isinstance(pairs, _Pairs)
            obj.clear()
            obj.update(pairs)
        return obj, changed

    def pairs(
        self, pairs: _Pairs, depth: int, nesting: int, owner: Any = None
    ) -> tuple[object, bool]:
        out, changed = _Pairs(), False
        owner = pairs if owner is None else owner
        for key, value in pairs:
            new_key, key_changed = self.string(key, depth, nesting)
            if self.skip(owner, key):
                out.append((new_key, value))
                changed |= key_changed
                continue
            rule = None if self.in_example else key_rule_for(self.redactor, key)
            if rule is not None:
                new_value, value_changed = self.mask(rule, value, depth + 1, nesting)
            elif key.lower() in _EXAMPLE_KEYS and not isinstance(value, str):
                self.in_example += 1
                try:
                    new_value, value_changed = self.value(value, depth + 1, nesting)
                finally:
                    self.in_example -= 1
            else:
                new_value, value_changed = self.value(value, depth + 1, nesting)
            out.append((new_key, new_value))
            changed |= key_changed or value_changed
        return (out if changed else pairs), changed

    def mask(self, rule: KeyRule, value: object, depth: int, nesting: int) -> tuple[object, bool]:
        """A credential field's value: a string the rule accepts becomes a tag (in an array
        under the field, each such string); anything else is walked like any other value, so
        numbers, objects and schemas keep their type."""
        if isinstance(value, str):
            if TAG_PATTERN.fullmatch(value) or not rule.accepts_value(value):
                return self.string(value, depth, nesting)
            self.count({rule.id: 1})
            return self.redactor.tag(rule.id, value), True
        if isinstance(value, list) and not isinstance(value, _Pairs):
            if depth > MAX_DEPTH:
                raise JsonRedactionError("json_too_deep", "JSON nesting too deep to redact")
            items, changed = [], False
            for item in value:
                new, item_changed = self.mask(rule, item, depth + 1, nesting)
                items.append(new)
                changed |= item_changed
            return (items if changed else value), changed
        return self.value(value, depth, nesting)

    def string(self, text: str, depth: int, nesting: int) -> tuple[str, bool]:
        if nesting < MAX_NESTED_DOCUMENTS and text.lstrip()[:1] in ("{", "["):
            document = _parse(text)
            if isinstance(document, list):  # objects are _Pairs, a list subclass
                value, changed = self.value(document, depth + 1, nesting + 1)
                return (serialize(value) if changed else text), changed
        result = self.redactor.redact_text(text)
        if not result.changed:
            return text, False
        self.count(result.counts)
        return result.text, True


def serialize(value: object) -> str:
    """Compact JSON of a parsed value: pairs in order (duplicates too), numbers as written."""
    parts: list[str] = []
    _emit(value, parts)
    return "".join(parts)


def _emit(value: object, parts: list[str]) -> None:
    if isinstance(value, _Pairs):
        parts.append("{")
        for index, (key, item) in enumerate(value):
            if index:
                parts.append(",")
            parts.append(_string(key))
            parts.append(":")
            _emit(item, parts)
        parts.append("}")
    elif isinstance(value, list):
        parts.append("[")
        for index, item in enumerate(value):
            if index:
                parts.append(",")
            _emit(item, parts)
        parts.append("]")
    elif isinstance(value, _Number):
        parts.append(value.text)
    elif isinstance(value, str):
        parts.append(_string(value))
    else:  # bool, None, and floats json.loads produced for NaN/Infinity
        parts.append(json.dumps(value))


def _string(text: str) -> str:
    """A JSON string literal; lone surrogates stay escapes, so the result encodes as UTF-8."""
    return _SURROGATE.sub(
        lambda m: f"\\u{ord(m.group()):04x}", json.dumps(text, ensure_ascii=False)
    )


class JsonStrings:
    """The `shapes.channels.StringPolicy` of buffered JSON: what streams and WebSocket messages
    use for key-addressed values and whole strings, so they get exactly what a buffered body gets
    (the same key rules from the rule pack, the same tags, nested documents parsed)."""

    # Strings (and keys) found to need nothing, remembered for this reader's life (one stream or
    # message sequence of one flow, whose redactor and literals do not change).
    MAX_REMEMBERED = 4096
    MAX_REMEMBERED_CHARS = 256

    def __init__(self, redactor: TextRedactor) -> None:
        self.redactor = redactor
        self._clean: set[str] = set()
        self._clean_keys: set[str] = set()

    def key_rule(self, name: str) -> KeyRule | None:
        return key_rule_for(self.redactor, name)

    def masked(self, rule: KeyRuleLike, value: str) -> tuple[str, Mapping[str, int]] | None:
        if TAG_PATTERN.fullmatch(value) or not rule.accepts_value(value):
            return None
        return self.redactor.tag(rule.id, value), {rule.id: 1}

    def whole(self, text: str) -> tuple[str, Mapping[str, int]]:
        walker = _Walker(self.redactor)
        new, _ = walker.string(text, 0, 0)
        return new, walker.counts

    def opaque(self, text: str) -> tuple[str, Mapping[str, int]]:
        if not self.redactor.holds_literal(text):
            return text, {}
        result = self.redactor.redact_text(text)
        return result.text, result.counts

    def walk(
        self, node: Any, skip: Callable[[Any, Hashable], bool], *, count: bool
    ) -> tuple[Any, bool, Mapping[str, int]]:
        if self._all_clean(node, skip):  # the usual event: ids, names and keys seen before
            return node, False, {}
        walker = _Walker(self.redactor, skip)
        new, changed = walker.value(node, depth=0, nesting=0)
        return new, changed, walker.counts if count else {}

    def _all_clean(self, node: Any, skip: Callable[[Any, Hashable], bool]) -> bool:
        """Whether walking `node` would change nothing: every string (keys too) needs nothing on
        its own and no key has a key rule. Exact: the walker would leave such a value alone."""
        clean, clean_keys = self._clean, self._clean_keys
        stack = [node]
        while stack:
            item = stack.pop()
            kind = type(item)
            if kind is dict:
                if not clean_keys.issuperset(item):
                    for key in item:
                        if key not in clean_keys and not self._remember_key(key):
                            return False
                for key, value in item.items():
                    vkind = type(value)
                    if vkind is str:
                        if value not in clean and not skip(item, key) and not self._remember(value):
                            return False
                    elif (vkind is dict or vkind is list) and not skip(item, key):
                        stack.append(value)
            elif kind is list:
                for value in item:
                    vkind = type(value)
                    if vkind is str:
                        if value not in clean and not self._remember(value):
                            return False
                    elif vkind is dict or vkind is list:
                        stack.append(value)
            elif kind is str:
                if item not in clean and not self._remember(item):
                    return False
            elif isinstance(item, str | dict | list):  # subclasses: let the walker judge
                return False
        return True

    def _remember(self, text: str) -> bool:
        return self._remember_in(self._clean, text)

    def _remember_key(self, key: str) -> bool:
        return self.key_rule(key) is None and self._remember_in(self._clean_keys, key)

    def _remember_in(self, known: set[str], text: str) -> bool:
        """Whether `text` needs nothing on its own; if so (and short) it is remembered."""
        new, counts = self.whole(text)
        if new != text or counts:
            return False
        if len(text) <= self.MAX_REMEMBERED_CHARS:
            if len(known) >= self.MAX_REMEMBERED:
                known.clear()
            known.add(text)
        return True
