"""egress.paths: one canonical reading of a request path, or a refusal.

The property tests read every accepted path the ways real upstreams do (decode once or twice,
`\\` as `/`, `;params` dropped, cut at NUL or `#`, dot segments resolved, `//` merged): each
reading must be the one routes and policy judged.
"""

from __future__ import annotations

import posixpath
import re
import urllib.parse

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sluicegate.egress.paths import AmbiguousPath, canonical_path, prefix_covers


@pytest.mark.parametrize(
    ("target", "wire", "decoded", "query"),
    [
        ("/v1/files", "/v1/files", "/v1/files", None),
        ("/v1/%66iles", "/v1/files", "/v1/files", None),
        ("/v1/%7euser/x", "/v1/~user/x", "/v1/~user/x", None),
        ("/v1/f%c3%a9", "/v1/f%C3%A9", "/v1/fé", None),
        ("/v1/a%20b%3Ac", "/v1/a%20b%3Ac", "/v1/a b:c", None),
        (
            "/v1/models/gpt:generate?alt=sse",
            "/v1/models/gpt:generate",
            "/v1/models/gpt:generate",
            "alt=sse",
        ),
        ("/v1/x?a=%2e%2e;b#c", "/v1/x", "/v1/x", "a=%2e%2e;b#c"),
        ("/v1/", "/v1/", "/v1/", None),
        ("/", "/", "/", None),
        ("/v1/...", "/v1/...", "/v1/...", None),
        ("/.well-known/x", "/.well-known/x", "/.well-known/x", None),
        ("/v1/a%25b", "/v1/a%25b", "/v1/a%b", None),
        ("/v1/Admin", "/v1/Admin", "/v1/Admin", None),
        ("/v1/[x]|{y}^", "/v1/[x]|{y}^", "/v1/[x]|{y}^", None),
        ("/v1/x?", "/v1/x", "/v1/x", ""),
    ],
)
def test_canonical_paths(target: str, wire: str, decoded: str, query: str | None) -> None:
    path = canonical_path(target)
    assert (path.wire, path.decoded, path.query) == (wire, decoded, query)
    assert path.target == (wire if query is None else f"{wire}?{query}")


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("/v1/safe/..;/admin", "`;` parameter"),
        ("/v1/admin;x", "`;` parameter"),
        ("/v1/admin%3bx", "encoded `;`"),
        ("/v1\\admin", "`\\`"),
        ("/v1%5cadmin", "encoded `\\`"),
        ("/v1/a%2Fb", "encoded `/`"),
        ("/v1/admin%00", "control character"),
        ("/v1/admin\x00", "control character"),
        ("/v1/admin\t", "control character"),
        ("/v1/a b", "space"),
        ("/v1/x#/../admin", "`#`"),
        ("/v1/fé", "outside ASCII"),
        ("/v1/../admin", "`.` or `..`"),
        ("/v1/%2e%2E/admin", "`.` or `..`"),
        ("/v1/./x", "`.` or `..`"),
        ("/v1/..", "`.` or `..`"),
        ("/v1//admin", "empty segment"),
        ("//v1", "empty segment"),
        ("/v1/%252e%252e/admin", "double encoding"),
        ("/v1/%x", "not a percent-escape"),
        ("/v1/%", "not a percent-escape"),
        ("/v1/%ff", "not UTF-8"),
        ("*", "no leading `/`"),
        ("", "no leading `/`"),
        ("v1/x", "no leading `/`"),
    ],
)
def test_ambiguous_paths_are_refused(target: str, reason: str) -> None:
    with pytest.raises(AmbiguousPath) as refused:
        canonical_path(target)
    assert reason in refused.value.reason
    assert refused.value.code == "invalid_path"
    assert target.strip("/") == "" or target not in refused.value.message


# -- every reading of an accepted path is the judged one ---------------------------------------

ALPHABET = "/.;%\\#?aA0-_~:@ \x00" + "%2e%2E%2f%3b%5c%00%25%41%c3%a9"


def tomcat(path: str) -> str:
    """Path parameters dropped from each segment (Tomcat, Spring, Jetty)."""
    return "/".join(segment.split(";", 1)[0] for segment in path.split("/"))


def resolved(path: str) -> str:
    """Dot segments resolved and `//` merged (nginx, most routers)."""
    out = posixpath.normpath(path)
    return out + "/" if path.endswith("/") and out != "/" else out


READINGS = {
    "decoded once": lambda p: urllib.parse.unquote(p, errors="strict"),
    "decoded twice": lambda p: urllib.parse.unquote(urllib.parse.unquote(p, errors="strict")),
    "backslash is a slash": lambda p: urllib.parse.unquote(p.replace("\\", "/")).replace("\\", "/"),
    "parameters dropped": lambda p: tomcat(urllib.parse.unquote(p)),
    "decoded, then parameters dropped": lambda p: urllib.parse.unquote(tomcat(p)),
    "cut at NUL": lambda p: urllib.parse.unquote(p).split("\x00", 1)[0],
    "cut at #": lambda p: urllib.parse.unquote(p.split("#", 1)[0]),
    "dot segments resolved": lambda p: resolved(urllib.parse.unquote(p)),
    "resolved before decoding": lambda p: urllib.parse.unquote(resolved(p)),
}


@given(st.text(alphabet=st.sampled_from(list(ALPHABET)), max_size=24).map(lambda s: "/" + s))
@example("/v1/safe/..;/admin")
@example("/v1/safe/%2e%2e;/admin")
@example("/v1/safe/..%00/admin")
@example("/v1/%2e%2e%2fadmin")
@example("/v1/%252e%252e/admin")
def test_every_upstream_reading_of_an_accepted_path_is_the_judged_one(target: str) -> None:
    try:
        path = canonical_path(target)
    except AmbiguousPath:
        return
    for name, read in READINGS.items():
        for form in (target.partition("?")[0], path.wire):
            assert read(form) == path.decoded, (name, form)
    assert canonical_path(path.target) == path  # idempotent: the forwarded path reads the same


@given(st.text(max_size=40).map(lambda s: "/" + s))
def test_accepted_paths_hold_nothing_a_reader_could_split_on(target: str) -> None:
    try:
        path = canonical_path(target)
    except AmbiguousPath:
        return
    assert not re.search(r"[;\\\x00-\x1f\x7f]", path.decoded)
    assert all(seg not in (".", "..") for seg in path.decoded.split("/"))
    assert "//" not in path.decoded
    assert path.wire.isascii() and " " not in path.wire


def test_prefixes_cover_whole_segments() -> None:
    assert prefix_covers("/v1/safe", "/v1/safe")
    assert prefix_covers("/v1/safe", "/v1/safe/x")
    assert not prefix_covers("/v1/safe", "/v1/saferoom")
    assert not prefix_covers("/v1/safe", "/V1/SAFE/x")
    assert prefix_covers("/v1/", "/v1/x") and not prefix_covers("/v1/", "/v1")
