"""Accuracy of the default pack on the vendored public secrets corpus (tests/data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, load_rule_pack

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "data" / "secrets-corpus"


def read(name: str) -> list[dict[str, str]]:
    lines = (CORPUS / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line]


POSITIVES, NEGATIVES = read("positives.jsonl"), read("negatives.jsonl")


def test_corpus_is_vendored_with_its_notice() -> None:
    assert len(POSITIVES) == 487 and len(NEGATIVES) == 191
    notice = (CORPUS / "README.md").read_text(encoding="utf-8")
    assert "MIT" in notice and "Apache-2.0" in notice


# `strict` is every rule meant for secrets (no PII); `default` leaves out the noisy ones.
# Both meet the target: recall >= 99%, at most 1% of the negatives changed.
@pytest.mark.parametrize(("profile", "min_recall"), [("strict", 0.99), ("default", 0.99)])
def test_recall_and_false_positives(profile: str, min_recall: float) -> None:
    redactor = Redactor(load_rule_pack([ROOT / "rules"], profile), Direction.REQUEST)
    caught = sum(r["secret"] not in redactor.redact_text(r["text"]).text for r in POSITIVES)
    changed = sum(redactor.redact_text(r["text"]).changed for r in NEGATIVES)
    assert caught / len(POSITIVES) >= min_recall
    assert changed / len(NEGATIVES) <= 0.01
