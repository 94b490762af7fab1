"""The one reading of a request path that routing and policy judge, and the upstream receives.

Upstreams disagree about paths: Tomcat and Spring drop `;parameters` (`/v1/safe/..;/admin` is
`/v1/admin` there), IIS reads `\\` as `/` and matches case-insensitively, some servers decode `%2F`
before routing and some twice, some cut the path at a NUL. A gateway that matched a route prefix
or a policy rule against one reading while the upstream acted on another would hand a scoped key
to a path outside its prefix, or let a blocked path through. So a path is either canonical, and
then every common reading of it is the same, or it is refused.

`canonical_path(path)` takes the request target's path (query and all, as mitmproxy has it) and
returns a `RequestPath`, or raises `AmbiguousPath`:

| in the path | becomes |
|---|---|
| `%XX` of an unreserved character (`A-Z a-z 0-9 - . _ ~`) | that character (RFC 3986 6.2.2.2) |
| any other `%XX` | kept encoded, hex in upper case (`%c3%a9` -> `%C3%A9`, RFC 3986 6.2.2.1) |
| `;` raw or `%3B` (path parameters) | refused |
| `\\` raw or `%5C`, `%2F` (an encoded `/`) | refused |
| `.` or `..` segment, in any spelling (`%2e%2e`, `.%2E`) | refused |
| an empty segment (`//`), other than a trailing `/` | refused |
| NUL or any control character, raw or encoded; a raw space, `#` or non-ASCII character | refused |
| `%` not followed by two hex digits; `%25` followed by two hex digits (double encoding) | refused |
| `%XX` bytes that are not UTF-8 | refused |
| not starting with `/` (`*`, empty) | refused |

The query string is kept as it is (query redaction is another concern). What the upstream receives
is `wire` (the gateway rewrites the request's path to it when it differs), so what was judged is
exactly what is forwarded. Routes and rules match `decoded`: `wire` with every `%XX` decoded.

Case: `decoded` keeps the case as sent. A route's `path_prefix` is matched case-sensitively (a
route grants a credential: only paths that really start with its prefix get it); policy path
rules are matched case-insensitively (`/v1/Admin` is `/v1/admin` on a case-insensitive upstream,
so a rule blocking one blocks both).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Final

_HEX: Final = frozenset("0123456789abcdefABCDEF")
_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Printable ASCII a path may hold raw. Not `;` (parameters), `\` (a separator on some servers),
# `#` (a fragment: some servers cut it off), `%` (handled as an escape), space or `?` (the query).
_RAW_ALLOWED: Final = frozenset(chr(c) for c in range(0x21, 0x7F) if chr(c) not in ";\\#%? ")
# Bytes that must not appear percent-encoded: they change how the path is split or read.
_ENCODED_REFUSED: Final = {
    0x2F: "an encoded `/` (%2F)",
    0x5C: "an encoded `\\` (%5C)",
    0x3B: "an encoded `;` (%3B)",
}


class AmbiguousPath(ValueError):
    """A path upstreams may read differently from the gateway. The message names the reason
    and never quotes the path (it may carry a secret)."""

    code: Final = "invalid_path"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def message(self) -> str:
        return (
            f"The request path has {self.reason}, which upstreams may read differently from the "
            "gateway's routes and policy; it was not forwarded."
        )


@dataclasses.dataclass(frozen=True)
class RequestPath:
    """A canonical request path. `wire` + `query` is what goes upstream."""

    wire: str  # the path as forwarded: canonical percent-encoding, no query
    decoded: str  # what routes and policy rules match: `wire` percent-decoded
    query: str | None  # the query string as received (without `?`), None: no `?`

    @property
    def target(self) -> str:
        """The request target to forward: the canonical path and the query as received."""
        return self.wire if self.query is None else f"{self.wire}?{self.query}"


def canonical_path(target: str) -> RequestPath:
    """The canonical reading of a request target's path; raises `AmbiguousPath`."""
    path, question, query = target.partition("?")
    wire, decoded = _canonical(path)
    return RequestPath(wire, decoded, query if question else None)


@functools.lru_cache(maxsize=4096)
def _canonical(path: str) -> tuple[str, str]:
    if not path.startswith("/"):
        raise AmbiguousPath("no leading `/`")
    wire: list[str] = []
    raw_bytes = bytearray()
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c == "%":
            pair = path[i + 1 : i + 3]
            if len(pair) != 2 or not _HEX.issuperset(pair):
                raise AmbiguousPath("a `%` that is not a percent-escape")
            byte = int(pair, 16)
            if byte < 0x20 or byte == 0x7F:
                raise AmbiguousPath("an encoded control character (such as %00)")
            refused = _ENCODED_REFUSED.get(byte)
            if refused is not None:
                raise AmbiguousPath(refused)
            char = chr(byte)
            if char in _UNRESERVED:
                wire.append(char)
            else:
                wire.append("%" + pair.upper())
            raw_bytes.append(byte)
            i += 3
            continue
        if c not in _RAW_ALLOWED:
            raise AmbiguousPath(_describe_raw(c))
        wire.append(c)
        raw_bytes.extend(c.encode("ascii"))
        i += 1
    try:
        decoded = raw_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise AmbiguousPath("percent-escapes that are not UTF-8") from None
    _check_decoded(decoded)
    return "".join(wire), decoded


def _check_decoded(decoded: str) -> None:
    if _has_double_escape(decoded):
        raise AmbiguousPath("an encoded percent-escape (double encoding, such as %252e)")
    segments = decoded.split("/")[1:]
    for i, segment in enumerate(segments):
        if segment in (".", ".."):
            raise AmbiguousPath("a `.` or `..` segment")
        if not segment and i < len(segments) - 1:
            raise AmbiguousPath("an empty segment (`//`)")


def _has_double_escape(decoded: str) -> bool:
    start = decoded.find("%")
    while start != -1:
        pair = decoded[start + 1 : start + 3]
        if len(pair) == 2 and _HEX.issuperset(pair):
            return True
        start = decoded.find("%", start + 1)
    return False


def _describe_raw(c: str) -> str:
    if c == ";":
        return "a `;` parameter"
    if c == "\\":
        return "a `\\`"
    if c == "#":
        return "a `#` (a fragment)"
    if c == " ":
        return "a space"
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return "a control character (such as NUL)"
    return "a character outside ASCII (send it percent-encoded)"


def prefix_covers(prefix: str, path: str) -> bool:
    """Segment-wise prefix match of decoded paths, case-sensitive: `/v1` covers `/v1` and
    `/v1/...`, not `/v1beta`; a prefix ending in `/` covers what starts with it."""
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")
