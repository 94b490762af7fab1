"""`python -m sluicegate rules test`: check every rule against its own examples.

Loads the rule files strictly (any file error is reported with its key path), then runs each
rule alone on its positive examples (the secret must be gone) and negative examples (the
text must be unchanged), and each key rule on its example key names. Exit status 0 when all
pass, 1 when an example fails, 2 when a rule file is invalid.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sluicegate.redaction.redactor import check_key_rule_examples, check_rule_examples
from sluicegate.redaction.rules import RuleError, load_rule_set

# addons/sluicegate/cli/rules.py -> repository root -> rules/
DEFAULT_RULES = Path(__file__).resolve().parents[3] / "rules"


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sluicegate rules", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    test = commands.add_parser("test", help="run every rule's examples")
    test.add_argument(
        "--rules", type=Path, action="append", help="rule file or directory (repeatable)"
    )
    args = parser.parse_args(list(argv))
    try:
        rule_set = load_rule_set(args.rules or [DEFAULT_RULES])
    except RuleError as exc:
        print(f"sluicegate rules: {exc}", file=sys.stderr)
        return 2
    failures = [f for rule in rule_set.rules for f in check_rule_examples(rule)]
    failures += [f for rule in rule_set.key_rules for f in check_key_rule_examples(rule)]
    for failure in failures:
        print(f"FAIL {failure}")
    examples = sum(len(r.positives) + len(r.negatives) for r in rule_set.rules)
    examples += sum(len(r.positives) + len(r.negatives) for r in rule_set.key_rules)
    print(
        f"{len(rule_set.rules)} rules, {len(rule_set.key_rules)} key rules, "
        f"{examples} examples in {len(rule_set.files)} files: "
        f"{len(failures)} failure(s)"
    )
    return 1 if failures else 0
