#!/usr/bin/env python3
"""Recall and false-positive rate of a rule pack on the public secrets corpus.

A positive record counts as caught when its `secret` substring no longer appears in the
redacted `text`; a negative record counts as a false positive when redaction changes it.

    python -m bench accuracy [--profile strict] [--rules rules/] [--show]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addons"))

from sluicegate.redaction.redactor import Redactor  # noqa: E402
from sluicegate.redaction.rules import Direction, load_rule_pack  # noqa: E402

CORPUS = ROOT / "tests" / "data" / "secrets-corpus"


@dataclass(frozen=True)
class Accuracy:
    positives: int
    caught: int
    negatives: int
    changed: int
    missed_sources: Counter[str]
    changed_sources: Counter[str]

    @property
    def recall(self) -> float:
        return self.caught / self.positives

    @property
    def false_positive_rate(self) -> float:
        return self.changed / self.negatives


def read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def measure(redactor: Redactor, corpus: Path = CORPUS) -> Accuracy:
    positives, negatives = read(corpus / "positives.jsonl"), read(corpus / "negatives.jsonl")
    missed = Counter(
        r["source"] for r in positives if r["secret"] in redactor.redact_text(r["text"]).text
    )
    changed = Counter(r["source"] for r in negatives if redactor.redact_text(r["text"]).changed)
    return Accuracy(
        positives=len(positives),
        caught=len(positives) - sum(missed.values()),
        negatives=len(negatives),
        changed=sum(changed.values()),
        missed_sources=missed,
        changed_sources=changed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=Path, action="append", help="rule file or directory")
    parser.add_argument(
        "--profile", action="append", help="profile(s) to measure (default: default and strict)"
    )
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--show", action="store_true", help="list sources of misses and FPs")
    args = parser.parse_args(argv)
    for profile in args.profile or ["default", "strict"]:
        pack = load_rule_pack(args.rules or [ROOT / "rules"], profile)
        accuracy = measure(Redactor(pack, Direction.REQUEST), args.corpus)
        print(
            f"{profile:>10}: recall {accuracy.recall:.2%} ({accuracy.caught}/{accuracy.positives}),"
            f" negatives changed {accuracy.false_positive_rate:.2%}"
            f" ({accuracy.changed}/{accuracy.negatives})"
        )
        if args.show:
            for source, n in sorted(accuracy.missed_sources.items()):
                print(f"    missed  {n} x {source}")
            for source, n in sorted(accuracy.changed_sources.items()):
                print(f"    changed {n} x {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
