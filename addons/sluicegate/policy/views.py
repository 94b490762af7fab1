"""What the policy reads of a body (`BodyViews`): the raw text and the texts it carries."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Iterator
from typing import Any

import regex

from sluicegate.shapes import form
from sluicegate.shapes.events import generated_text

# -- what the policy sees of a flow ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BodyViews:
    """The texts of a body that patterns run over.

    The raw text, plus the decoded string values of a JSON body (so `\\n` escapes are newlines
    again), the decoded fields of a form body (URL-encoded, or a multipart body's text parts,
    transfer encodings decoded; read by shapes/form.py as redaction reads them), or the
    generated text of a buffered SSE body (every text channel of its events, read by the
    content model of shapes/events.py as streams are, joined, so a command split over many
    deltas is whole again). A pattern is found when it
    matches often enough in any one view, so re-encoding a secret inside JSON does not hide it.
    """

    size: int
    views: tuple[str, ...]

    @classmethod
    def of(cls, content: bytes, content_type: str | None = None) -> BodyViews:
        raw = content.decode("utf-8", "replace")
        views = [raw]
        ctype = (content_type or "").lower()
        if "json" in ctype or _looks_like_json(raw):
            with contextlib.suppress(ValueError, RecursionError):
                views.append("\n".join(_json_strings(json.loads(raw))))
        elif form.FORM_TYPE in ctype:
            fields = form.UrlEncodedForm.parse(raw).fields()
            views.append("\n".join(f"{k}={v}" for k, v in fields))
        elif ctype.startswith("multipart/"):
            fields = form.text_fields(content, _params(content_type or ""), is_text=_is_text)
            views.append("\n".join(f"{k}={v}" for k, v in fields))
        elif "text/event-stream" in ctype:
            views.append(generated_text(content))
        return cls(size=len(content), views=tuple(views))

    @classmethod
    def of_text(cls, text: str) -> BodyViews:
        return cls(size=len(text.encode("utf-8", "replace")), views=(text,))

    def lowered(self, index: int) -> str:
        """Lower-cased view `index`, computed once for all patterns' anchor checks."""
        return self._lowered[index]

    @functools.cached_property
    def _lowered(self) -> tuple[str, ...]:
        return tuple(v.lower() for v in self.views)


def _params(content_type: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for param in content_type.split(";")[1:]:
        name, sep, value = param.partition("=")
        if sep:
            params[name.strip().lower()] = value.strip().strip('"')
    return params


def _is_text(part_type: str) -> bool:
    """A multipart part a pattern can read: text, JSON, XML, forms (never files' bytes)."""
    media = part_type.split(";", 1)[0].strip().lower()
    return (
        media.startswith("text/")
        or "json" in media
        or media.endswith("xml")
        or media == form.FORM_TYPE
    )


def _looks_like_json(text: str) -> bool:
    m = _FIRST_CHAR.match(text)
    return m is not None and m.group(1) in "{["


_FIRST_CHAR = regex.compile(r"\s*(\S)")


def _json_strings(value: Any) -> Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for k, v in item.items():
                yield k
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(reversed(item))
