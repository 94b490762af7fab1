#!/usr/bin/env python3
"""Redaction throughput and streaming cost of rule pack profiles.

Generates a fixed (seeded) mix of code, JSON and prose documents with a few secrets taken
from the rule files' own positive examples (the same documents for every profile), then
measures for each profile, in the same run and on one core:

- whole-text throughput of `Redactor.redact_text` (MB/s of CPU time, best of `--runs`), per
  document as the gateway does;
- the naive baseline: every enabled rule's regex over every document, no prefilter, and the
  speed-up over it;
- streaming: median / p99 cost of `StreamRedactor.feed` for clean prose split into realistic
  1-6 character tokens, and the hold rate (share of feeds that left something held back).

    python -m bench redact [--rules rules/] [--profile default --profile strict] [--mb 10]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addons"))

from sluicegate.redaction.redactor import Redactor  # noqa: E402
from sluicegate.redaction.rules import Direction, RulePack, load_rule_pack, load_rule_set  # noqa: E402

WORDS = """
    the of and to in is it that for you was with on as have be at not this are but from or by
    one had all were we when your can said there use an each which she do how their if will up
    other about out many then them these so some her would make like him into time has look two
    more write go see number no way could people my than first water been call who oil its now
    find long down day did get come made may part request response model stream token budget
    latency function return value error retry cache user server client config deploy build test
    release secret policy gateway agent review change branch commit merge file path line column
    """.split()  # noqa: SIM905 - a word list reads better here
IDENTIFIERS = """
    user_id account name items total result handler request_body payload config options session
    cursor buffer index offset limit parser encoder decoder logger metrics max_tokens
    temperature messages content role tool_calls arguments status created model
    """.split()  # noqa: SIM905 - a word list reads better here


def random_identifier(rng: random.Random) -> str:
    base = rng.choice(IDENTIFIERS)
    return base if rng.random() < 0.6 else f"{base}_{rng.choice(IDENTIFIERS)}"


# Zipf-like word frequencies: function words dominate, domain words are rarer, as in English.
WEIGHTS = [1 / (rank + 1) for rank in range(len(WORDS))]


def prose(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        words = rng.choices(WORDS, WEIGHTS, k=rng.randint(6, 20))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(1, 5000)))
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words)), f"`{random_identifier(rng)}`")
        sentence = " ".join(words).capitalize() + rng.choice([".", ".", ",", "?", ":"])
        if rng.random() < 0.15:
            sentence += "\n\n" + rng.choice(["## ", "- ", "1. ", "> "])
        out.append(sentence)
        length += len(sentence) + 1
    return " ".join(out)


def code(rng: random.Random, size: int) -> str:
    lines: list[str] = []
    length = 0
    while length < size:
        name = random_identifier(rng)
        kind = rng.random()
        if kind < 0.2:
            line = f"def {name}(self, {random_identifier(rng)}, limit={rng.randint(1, 99)}):"
        elif kind < 0.4:
            line = f'    {name} = self.{random_identifier(rng)}.get("{random_identifier(rng)}", 0)'
        elif kind < 0.5:
            line = f"    # {prose(rng, 40)}"
        elif kind < 0.6:
            line = f'    url = "https://api.example.com/v1/{name}?page={rng.randint(1, 9)}"'
        elif kind < 0.7:
            line = f"    if {name} is None or len({name}) > {rng.randint(1, 512)}:"
        elif kind < 0.78:
            line = f"    return {{'{name}': {random_identifier(rng)}, 'count': count}}"
        elif kind < 0.8:
            line = f'    password = os.environ["{name.upper()}_PASSWORD"]'
        elif kind < 0.82:
            line = f"    headers = {{'Authorization': f'Bearer {{token}}', 'key': {name}}}"
        elif kind < 0.9:
            line = f"    {name}: dict[str, int] = {{}}"
        else:
            line = f"const {name} = await fetch(`/api/${{{random_identifier(rng)}}}`);"
        lines.append(line)
        length += len(line) + 1
    return "\n".join(lines)


def json_doc(rng: random.Random, size: int) -> str:
    messages: list[dict[str, object]] = []
    length = 0
    while length < size:
        message: dict[str, object] = {
            "role": rng.choice(["user", "assistant", "tool"]),
            "content": prose(rng, rng.randint(50, 600)),
            "id": "".join(rng.choices(string.hexdigits.lower(), k=32)),
            "created": rng.randint(1_600_000_000, 1_800_000_000),
        }
        if rng.random() < 0.3:
            arguments = {"path": f"src/{random_identifier(rng)}.py", "limit": rng.randint(1, 50)}
            message["tool_calls"] = [
                {
                    "type": "function",
                    "function": {"name": "read", "arguments": json.dumps(arguments)},
                }
            ]
        messages.append(message)
        length += len(json.dumps(message))
    return json.dumps({"model": "gpt-x", "max_tokens": 1024, "messages": messages}, indent=1)


def documents(secrets: list[str], megabytes: float, seed: int = 1234) -> list[str]:
    """The benchmark corpus: deterministic for given secrets, size and seed."""
    rng = random.Random(seed)
    docs: list[str] = []
    total = 0
    target = int(megabytes * 1_000_000)
    while total < target:
        size = rng.choice([2_000, 8_000, 16_000, 32_000, 64_000])
        maker = rng.choice([prose, code, json_doc])
        doc = maker(rng, size)
        if rng.random() < 0.3:  # a few secrets, about one in three documents
            at = rng.randrange(len(doc))
            doc = f"{doc[:at]}\n{rng.choice(secrets)}\n{doc[at:]}"
        docs.append(doc)
        total += len(doc)
    return docs


def best_of(runs: int, action) -> float:
    """CPU seconds of this process (one core), best of `runs`: other work on the machine
    shows less in CPU time than in wall time."""
    timings = []
    for _ in range(runs):
        start = time.process_time()
        action()
        timings.append(time.process_time() - start)
    return min(timings)


def naive_baseline(pack: RulePack, docs: list[str]) -> None:
    for doc in docs:
        for rule in pack.rules_for(Direction.REQUEST):
            for match in rule.pattern.finditer(doc):
                rule.accepts(match.group(rule.group) or "")


def tokens(rng: random.Random, text: str) -> list[str]:
    """Split like an LLM tokenizer: word pieces of 1-6 characters that start at word
    boundaries (with their leading space), longer words in several pieces."""
    pieces: list[str] = []
    for word in re.findall(r"\s*\w+|\s*[^\w\s]+|\s+", text):
        while word:
            step = len(word) if len(word) <= 6 else rng.randint(3, 6)
            pieces.append(word[:step])
            word = word[step:]
    return pieces


def stream_figures(redactor: Redactor, seed: int = 99) -> dict[str, float]:
    rng = random.Random(seed)
    text = prose(rng, 200_000)
    pieces = tokens(rng, text)
    stream = redactor.stream(max_hold=4096)
    costs: list[float] = []
    held = 0
    clock = time.perf_counter
    for piece in pieces:
        start = clock()
        stream.feed(piece)
        costs.append(clock() - start)
        if stream.held:
            held += 1
    stream.flush()
    costs.sort()
    return {
        "feeds": len(pieces),
        "median_us": statistics.median(costs) * 1e6,
        "p99_us": costs[int(len(costs) * 0.99)] * 1e6,
        "hold_rate": held / len(pieces),
    }


@dataclass(frozen=True)
class Figures:
    profile: str
    rules: int
    mb_per_s: float
    naive_mb_per_s: float
    redactions: int
    feed_median_us: float
    feed_p99_us: float
    hold_rate: float

    @property
    def speed_up(self) -> float:
        return self.mb_per_s / self.naive_mb_per_s


def measure(pack: RulePack, docs: list[str], runs: int) -> Figures:
    redactor = Redactor(pack, Direction.REQUEST)
    size_mb = sum(len(d) for d in docs) / 1e6
    redactions = sum(sum(redactor.redact_text(doc).counts.values()) for doc in docs)
    fast = best_of(runs, lambda: [redactor.redact_text(doc) for doc in docs])
    naive = best_of(1, lambda: naive_baseline(pack, docs))
    stream = stream_figures(redactor)
    return Figures(
        profile=pack.profile,
        rules=len(pack.rules),
        mb_per_s=size_mb / fast,
        naive_mb_per_s=size_mb / naive,
        redactions=redactions,
        feed_median_us=stream["median_us"],
        feed_p99_us=stream["p99_us"],
        hold_rate=stream["hold_rate"],
    )


HEADER = (
    f"{'profile':<10} {'rules':>5} {'MB/s':>7} {'naive MB/s':>10} {'speed-up':>8} "
    f"{'redactions':>10} {'feed median us':>14} {'feed p99 us':>11} {'hold rate':>9}"
)


def row(f: Figures) -> str:
    return (
        f"{f.profile:<10} {f.rules:>5} {f.mb_per_s:>7.1f} {f.naive_mb_per_s:>10.1f} "
        f"{f.speed_up:>7.1f}x {f.redactions:>10} {f.feed_median_us:>14.1f} "
        f"{f.feed_p99_us:>11.1f} {f.hold_rate:>9.2%}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=Path, action="append", help="rule file or directory")
    parser.add_argument(
        "--profile", action="append", help="profile(s) to measure (default: default and strict)"
    )
    parser.add_argument("--mb", type=float, default=10.0, help="corpus size in MB")
    parser.add_argument("--runs", type=int, default=3, help="whole-text runs (the best counts)")
    args = parser.parse_args(argv)

    paths = args.rules or [ROOT / "rules"]
    rule_set = load_rule_set(paths)
    docs = documents([e.text for rule in rule_set.rules for e in rule.positives], args.mb)
    size_mb = sum(len(d) for d in docs) / 1e6
    print(f"corpus: {len(docs)} docs, {size_mb:.1f} MB; stream: clean prose, 1-6 char feeds")
    print(HEADER)
    for profile in args.profile or ["default", "strict"]:
        print(row(measure(load_rule_pack(paths, profile), docs, args.runs)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
