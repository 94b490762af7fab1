"""`python -m bench precision --smoke` runs on the committed smoke subset (so it cannot rot)."""

from __future__ import annotations

import json

import pytest

from bench import __main__ as bench_main
from bench import precision

CATEGORIES = {"api-spec", "chat-payload", "go-source", "lock-file", "notebook", "python-source",
              "test-vectors"}  # fmt: skip


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("bench") / "precision.json"
    assert bench_main.main(["precision", "--smoke", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    return {entry["profile"]: entry for entry in data["profiles"]}


def test_smoke_measures_every_profile_and_category(figures: dict[str, dict]) -> None:
    assert set(figures) == set(precision.PROFILES)
    for entry in figures.values():
        assert set(entry["files"]) == CATEGORIES
        assert entry["mb"] > 0.05
        assert entry["redactions"] == sum(entry["per_rule"].values())


def test_smoke_subset_is_clean_in_the_default_profile(figures: dict[str, dict]) -> None:
    default = figures["default"]
    assert default["redactions"] == 0, default["per_rule"]
    for entry in figures.values():
        assert entry["json_type_changes"] == 0
        assert all(entry["files_changed"].get(c, 0) == 0 for c in precision.UNTOUCHABLE)


def test_dispatcher_lists_and_refuses_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main.main([]) == 2
    assert "precision" in capsys.readouterr().out
    assert bench_main.main(["no-such-bench"]) == 2


def test_type_changes_are_counted_inside_nested_json() -> None:
    before = {"a": {"password": {"type": "string"}}, "args": json.dumps({"token": 42})}
    after = {"a": {"password": "[REDACTED:x]"}, "args": json.dumps({"token": "[REDACTED:x]"})}
    assert precision.type_changes(before, after) == 2
    assert precision.type_changes(before, before) == 0


def test_known_examples_are_recognised() -> None:
    assert precision.KNOWN_EXAMPLES.search("AKIAIOSFODNN7EXAMPLE")
    assert precision.KNOWN_EXAMPLES.search("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert not precision.KNOWN_EXAMPLES.search("AKIAZ3MSJV4WJQ2B7HGF")
