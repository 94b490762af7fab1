"""Base-URL prefixes: `/openai/v1/chat/completions` -> route `openai`, path `/v1/chat/completions`.

Agents that cannot use a proxy (Node before 24, SDKs without proxy support) are given the gateway
as their API's base URL instead: `OPENAI_BASE_URL=http://gateway:8081/openai/v1`. The first
segments of the path name the route; the rest is the upstream path. The whole path is read with
`canonical_path` before any prefix is matched, so `/openai/../anthropic/v1` or its encoded
spellings are refused (400 `invalid_path`) rather than resolved, and the upstream receives the
remainder in its canonical form.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Final

from sluicegate.egress.paths import RequestPath, canonical_path, prefix_covers

# A prefix is one or more plain segments: what a URL may hold without any escaping.
_PREFIX: Final = re.compile(r"(?:/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+")


def prefix_problem(prefix: str) -> str | None:
    """Why `prefix` cannot be a base-URL prefix (None: it can)."""
    if not _PREFIX.fullmatch(prefix):
        return "must be `/` and plain segments (letters, digits, `-`, `_`, `.`, `~`), e.g. /openai"
    if any(segment in (".", "..") for segment in prefix.split("/")):
        return "must not hold `.` or `..` segments"
    return None


class UnknownPrefix(LookupError):
    """No configured prefix covers the path."""


@dataclasses.dataclass(frozen=True)
class Mapped:
    """A base-URL request mapped to its route: the prefix, the route's name, the upstream
    target (canonical path and query as received)."""

    prefix: str
    route: str
    target: str


class PrefixTable:
    """Configured prefixes, the longest first (`/openai/beta` before `/openai`)."""

    def __init__(self, prefixes: Mapping[str, str]) -> None:
        self._prefixes = sorted(prefixes.items(), key=lambda item: len(item[0]), reverse=True)

    @property
    def prefixes(self) -> list[str]:
        return sorted(prefix for prefix, _ in self._prefixes)

    def map(self, target: str) -> Mapped:
        """Map a request target. Raises `AmbiguousPath` for a path upstreams may read
        differently, `UnknownPrefix` when no prefix covers it."""
        path = canonical_path(target)
        return self.map_path(path)

    def map_path(self, path: RequestPath) -> Mapped:
        for prefix, route in self._prefixes:
            if prefix_covers(prefix, path.decoded):
                rest = path.wire[len(prefix) :] or "/"
                target = rest if path.query is None else f"{rest}?{path.query}"
                return Mapped(prefix, route, target)
        raise UnknownPrefix(path.decoded)
