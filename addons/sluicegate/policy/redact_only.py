"""`redact_only`: replace what a rule's patterns matched, keeping JSON and forms valid."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from sluicegate.policy.decisions import PolicyError, ScanTimeout
from sluicegate.policy.patterns import Pattern
from sluicegate.policy.views import _is_text, _looks_like_json, _params
from sluicegate.shapes import form

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
    form bodies field by field through the form model (shapes/form.py: URL-encoded pairs that
    did not change stay as sent; a multipart body's text parts, file parts untouched), other
    bodies as UTF-8 text. Raises PolicyError for bodies that cannot be rewritten safely (not
    UTF-8, an unreadable multipart body). The caller re-checks the result: what a rewrite cannot
    reach (a secret inside a JSON key) is still found and must then be blocked.
    """
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
    if ctype.startswith("multipart/"):
        return _redact_multipart(content, _params(content_type or ""), sub), total
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(
            "policy_cannot_redact", "the body is not UTF-8 text and cannot be redacted"
        ) from None
    if "json" in ctype or _looks_like_json(text):
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            document = _NOT_JSON
        if document is not _NOT_JSON:
            out = json.dumps(_map_strings(document, sub), ensure_ascii=False)
            return out.encode("utf-8"), total
    if form.FORM_TYPE in ctype:
        out = form.UrlEncodedForm.parse(text).rewrite(lambda name, value: (name, sub(value)))
        return out.encode("utf-8", "surrogateescape"), total
    return sub(text).encode("utf-8"), total


_NOT_JSON = object()


def _redact_multipart(content: bytes, params: dict[str, str], sub: Callable[[str], str]) -> bytes:
    """A multipart body's UTF-8 text parts rewritten by `sub`; files and the framing as sent."""
    try:
        multipart = form.MultipartForm.parse(content, params.get("boundary"))
        bodies: dict[int, bytes] = {}
        for index, part in enumerate(multipart.parts):
            if not _is_text(part.content_type):
                continue
            data = multipart.part_body(part)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue  # left as it is: the caller's re-check still finds what it holds
            new = sub(text)
            if new != text:
                bodies[index] = multipart.encoded(part, new.encode("utf-8"))
    except form.FormError:
        raise PolicyError(
            "policy_cannot_redact", "the multipart body cannot be read and cannot be redacted"
        ) from None
    return multipart.rebuild(bodies)


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value
