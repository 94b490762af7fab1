"""`python -m sluicegate redact`: run the redaction engine on a file, as the gateway would.

Writes the redacted body to stdout and a per-rule summary to stderr (rule ids and counts,
never the matched values). With `--jsonl`, reads one JSON object per line, redacts its
`text` field (typed by its `content_type` field when present) and writes the objects back.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from sluicegate.redaction.bodies import BodyPolicy, BodyRefused, redact_body
from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, RuleError, load_rule_pack

# addons/sluicegate/cli/redact.py -> repository root -> rules/
DEFAULT_RULES = Path(__file__).resolve().parents[3] / "rules"


def build_parser(prog: str = "python -m sluicegate redact") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rules", type=Path, action="append", help="rule file or directory (repeatable)"
    )
    parser.add_argument("--profile", default="default", help="rule profile (default: default)")
    parser.add_argument(
        "--direction", choices=[d.value for d in Direction], default=Direction.REQUEST.value
    )
    parser.add_argument("--content-type", help="Content-Type of the input (default: sniff)")
    parser.add_argument(
        "--jsonl", action="store_true", help="input is JSON lines with a `text` field"
    )
    parser.add_argument("file", nargs="?", type=Path, help="input file (default: stdin)")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        pack = load_rule_pack(args.rules or [DEFAULT_RULES], args.profile)
    except RuleError as exc:
        print(f"sluicegate redact: {exc}", file=sys.stderr)
        return 2
    redactor = Redactor(pack, Direction(args.direction))
    # An operator tool: show binary bodies unchanged rather than refusing them.
    policy = BodyPolicy(binary="pass", unknown="text")
    data = args.file.read_bytes() if args.file else sys.stdin.buffer.read()
    counts: dict[str, int] = {}
    try:
        if args.jsonl:
            output = _redact_jsonl(data, redactor, policy, counts)
        else:
            result = redact_body(data, args.content_type, redactor, policy)
            output = result.body
            _merge(counts, result.counts)
    except BodyRefused as exc:
        print(f"sluicegate redact: refused ({exc.code}): {exc.message}", file=sys.stderr)
        return 3
    except ValueError as exc:
        print(f"sluicegate redact: {exc}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(output)
    sys.stdout.buffer.flush()
    _summary(counts)
    return 0


def _redact_jsonl(
    data: bytes, redactor: Redactor, policy: BodyPolicy, counts: dict[str, int]
) -> bytes:
    out: list[str] = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"line {number}: expected a JSON object with a string `text` field")
        content_type = record.get("content_type")
        if content_type is not None and not isinstance(content_type, str):
            raise ValueError(f"line {number}: `content_type` must be a string")
        result = redact_body(text.encode("utf-8"), content_type, redactor, policy)
        if result.changed:
            record["text"] = result.body.decode("utf-8")
            _merge(counts, result.counts)
        out.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(out).encode("utf-8")


def _summary(counts: dict[str, int]) -> None:
    total = sum(counts.values())
    lines = [f"{total} redaction(s)"] + [f"  {rule}: {n}" for rule, n in sorted(counts.items())]
    print("\n".join(lines), file=sys.stderr)


def _merge(total: dict[str, int], counts: dict[str, int]) -> None:
    for rule_id, n in counts.items():
        total[rule_id] = total.get(rule_id, 0) + n
