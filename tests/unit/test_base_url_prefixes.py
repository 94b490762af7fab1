"""Base-URL prefixes: the whole path is read canonically, then the longest prefix names its
route."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluicegate.egress.base_url import PrefixTable, UnknownPrefix, prefix_problem
from sluicegate.egress.paths import AmbiguousPath

TABLE = PrefixTable({"/openai": "openai", "/openai/beta": "beta", "/anthropic": "anthropic"})


@pytest.mark.parametrize(
    ("target", "route", "forwarded"),
    [
        ("/openai/v1/chat/completions", "openai", "/v1/chat/completions"),
        ("/openai/v1/models?limit=2&x=%2F", "openai", "/v1/models?limit=2&x=%2F"),
        ("/openai", "openai", "/"),
        ("/openai/", "openai", "/"),
        ("/openai/beta/v1/x", "beta", "/v1/x"),  # the longest prefix wins
        ("/anthropic/v1/messages", "anthropic", "/v1/messages"),
        ("/%6Fpenai/v1/%66iles", "openai", "/v1/files"),  # canonical spelling goes upstream
        ("/openai/v1/caf%c3%a9", "openai", "/v1/caf%C3%A9"),
    ],
)
def test_mapping(target: str, route: str, forwarded: str) -> None:
    mapped = TABLE.map(target)
    assert (mapped.route, mapped.target) == (route, forwarded)


@pytest.mark.parametrize(
    "target", ["/", "/openaiX/v1", "/OpenAI/v1", "/nope", "/anthropicbeta/v1/messages"]
)
def test_unknown_prefixes(target: str) -> None:
    with pytest.raises(UnknownPrefix):
        TABLE.map(target)


@pytest.mark.parametrize(
    "target",
    [
        "/openai/../anthropic/v1/messages",
        "/openai/%2e%2e/anthropic/v1",
        "/openai/%2E%2E%2Fanthropic",
        "/openai/./v1",
        "/openai//v1",
        "/openai/v1/%252e%252e",
        "/openai;x/v1",
        "/openai\\..\\anthropic",
        "/openai/%00",
        "openai/v1",
    ],
)
def test_traversal_and_ambiguous_paths_are_refused_before_mapping(target: str) -> None:
    with pytest.raises(AmbiguousPath):
        TABLE.map(target)


@given(st.text(alphabet="abc/.%2eE5Cf;", max_size=24))
def test_a_mapped_path_never_leaves_its_prefix(suffix: str) -> None:
    """Whatever follows the prefix, the upstream path is canonical and starts at the route's
    root: no spelling climbs out of it."""
    try:
        mapped = TABLE.map("/openai/" + suffix)
    except (AmbiguousPath, UnknownPrefix):
        return
    assert mapped.target.startswith("/")
    segments = mapped.target.partition("?")[0].split("/")
    assert ".." not in segments and "." not in segments


@pytest.mark.parametrize(
    ("prefix", "ok"),
    [
        ("/openai", True),
        ("/v1/openai-eu", True),
        ("openai", False),
        ("/", False),
        ("/openai/", False),
        ("/a/../b", False),
        ("/a/.", False),
        ("/%6F", False),
        ("/a b", False),
    ],
)
def test_prefix_problems(prefix: str, ok: bool) -> None:
    assert (prefix_problem(prefix) is None) is ok
