"""`redact_only`: replace what a rule's patterns matched, keeping JSON and forms valid."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

from sluicegate.policy.decisions import PolicyError, ScanTimeout
from sluicegate.policy.patterns import Pattern
from sluicegate.policy.views import _looks_like_json

# -- redact_only ------------------------------------------------------------------------------


def redact_body(
    content: bytes,
    content_type: str | None,
    patterns: Sequence[Pattern],
    tag: str,
    timeout: float | None = None,
) -> tuple[bytes, int]:
    """Replace every match of `patterns` by `tag`; returns the new body and the replacements.

    JSON bodies are rewritten value by value (the JSON stays valid, escapes are decoded first),
    form bodies value by value, other bodies as UTF-8 text. Raises PolicyError for bodies that
    cannot be rewritten safely (not UTF-8). The caller re-checks the result: what a rewrite cannot
    reach (a secret inside a JSON key) is still found and must then be blocked.
    """
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(
            "policy_cannot_redact", "the body is not UTF-8 text and cannot be redacted"
        ) from None
    total = 0

    def sub(value: str) -> str:
        nonlocal total
        for pattern in patterns:
            try:
                value, n = pattern.regex.subn(tag, value, concurrent=True, timeout=timeout)
            except TimeoutError:
                raise ScanTimeout(
                    "policy_scan_timeout", f"pattern {pattern.name!r} exceeded the scan budget"
                ) from None
            total += n
        return value

    ctype = (content_type or "").lower()
    if "json" in ctype or _looks_like_json(text):
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            document = _NOT_JSON
        if document is not _NOT_JSON:
            out = json.dumps(_map_strings(document, sub), ensure_ascii=False)
            return out.encode("utf-8"), total
    if "application/x-www-form-urlencoded" in ctype:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True)
        out = urllib.parse.urlencode([(k, sub(v)) for k, v in pairs])
        return out.encode("utf-8"), total
    return sub(text).encode("utf-8"), total


_NOT_JSON = object()


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value
